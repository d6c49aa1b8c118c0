"""Setup time and peak memory of the DataModule at PQA-A's size (211,269 questions), first
build and from the tokenized-example cache, in 1 and 2 processes, on the CPU.

    python benchmarks/data_scale.py --pqal ori_pqal.json

It writes (outside the repository, never committed) a file in the original `ori_pqaa.json`
schema with PQA-L's abstracts under unique questions, 450 MB for all records, and the 10%
file beside it; trains the benchmarks' tokenizer (`make_random_llama.py`'s, that of the 8B
shape); then for each file and process count runs `QADataModule(source=ori_pqal.json,
train_source=<file>).setup("fit")` and takes the first training batch in fresh processes:
first with an empty cache (the build), then again (the cache). Each row gives the slowest
process's seconds from its start to its first batch, its peak resident memory, the part of
it at the first batch that is its own (private) and that is mapped files (the cache's pages,
shared by every process that maps them, and the libraries), and how many processes built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PQAA_SIZE = 211_269


def write_pqaa(pqal: Path, out: Path, n: int) -> None:
    """`n` records in ori_pqaa.json's schema: PQA-L's records over and over, each with a new
    id and a question made unique (PQA-A's ids and questions are not PQA-L's)."""
    base = list(json.loads(pqal.read_text()).items())
    with out.open("w") as f:
        f.write("{")
        for i in range(n):
            _, r = base[i % len(base)]
            record = {**r, "QUESTION": f"{r['QUESTION']} (variant {i})", "final_decision": r["final_decision"]}
            record.pop("reasoning_required_pred", None)
            record.pop("reasoning_free_pred", None)
            f.write(("," if i else "") + json.dumps(str(50_000_000 + i)) + ":" + json.dumps(record))
        f.write("}")


CHILD = """
import resource, sys, time, json
start = time.perf_counter()
from medqa.data import QADataModule
dm = QADataModule(source=sys.argv[1], train_source=sys.argv[2], pretrained=sys.argv[3], cache_dir=sys.argv[4],
                  max_length=1024, batch_size=8)
dm.setup("fit")
batch = next(iter(dm.train_dataloader()))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "anon_gib": int(status["RssAnon"].split()[0]) / 2**20, "file_gib": int(status["RssFile"].split()[0]) / 2**20,
                  "built": dm.built_cache, "examples": len(dm.examples["train"]),
                  "tokens": int(sum(dm.examples["train"].lengths()))}))
"""


def run(processes: int, pqal: Path, train: Path, tokenizer: Path, cache: Path) -> list[dict]:
    """`processes` children at once, as the processes of a DDP run start; their reports."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(pqal), str(train), str(tokenizer), str(cache)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for _ in range(processes)]
    reports = []
    for child in children:
        out, err = child.communicate()
        if child.returncode:
            raise SystemExit(f"a setup failed:\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pqal", type=Path, required=True, help="ori_pqal.json")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medqa-data-scale",
                        help="where the synthetic files, the tokenizer and the caches go (outside the repository)")
    parser.add_argument("--fractions", default="0.1,1.0")
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from make_random_llama import benchmark_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        benchmark_tokenizer(args.pqal).save_pretrained(tokenizer)
    rows = []
    for fraction in map(float, args.fractions.split(",")):
        n = round(PQAA_SIZE * fraction)
        train = args.work / f"ori_pqaa-{n}.json"
        if not train.is_file():
            write_pqaa(args.pqal, train, n)
        for processes in map(int, args.processes.split(",")):
            cache = args.work / f"cache-{n}-{processes}"
            shutil.rmtree(cache, ignore_errors=True)
            for when in ("first build", "cached"):
                reports = run(processes, args.pqal, train, tokenizer, cache)
                rows.append((f"{n:,} ({fraction:.0%})", processes, when, max(r["seconds"] for r in reports),
                             max(r["peak_gib"] for r in reports), max(r["anon_gib"] for r in reports),
                             max(r["file_gib"] for r in reports), sum(r["built"] for r in reports), reports[0]["tokens"]))
                print(rows[-1], flush=True)
    print(f"\n{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at the end, {time.strftime('%Y-%m-%d')}\n")
    print("| training records | processes | cache | seconds to the first batch (slowest process) | peak resident memory "
          "a process | at the first batch: private / mapped files | builds | training tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, processes, when, seconds, peak, anon, mapped, builds, tokens in rows:
        print(f"| {name} | {processes} | {when} | {seconds:.1f} | {peak:.2f} GiB | {anon:.2f} / {mapped:.2f} GiB | {builds} "
              f"| {tokens / 1e6:.1f} M |")


if __name__ == "__main__":
    main()
