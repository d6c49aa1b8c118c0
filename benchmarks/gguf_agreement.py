"""Do the GGUF files that `export --gguf` writes answer as the adapter they came from? One
checkpoint, exported, then the same questions scored three ways through `python -m medqa
predict`: the base with the adapter, and each GGUF file given as the base (no adapter).

    python benchmarks/gguf_agreement.py --config configs/smollm2.yaml --ckpt_path CKPT \\
        --data ../shared/data/pubmedqa/ori_pqal.json --out OUT [--model.dtype float32 ...]

With `--llama_cpp N` (llama-cpp-python installed), llama.cpp also reads each GGUF file and
answers the first N test questions from the label words' logits, fed medqa's own token ids:
the count that match medqa's answers from the same file, and the adapter's.

Options it does not know itself (`--model.dtype float32`, `--trainer.accelerator gpu`) go to
every `python -m medqa` command it runs, export included.

Prints one table row a file: its size, the share of questions answered alike, the largest
difference in a label probability, and accuracy / macro-F1 against the truth beside the
adapter's (the official test split unless `--split` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medqa.compare import label_scores  # noqa: E402

LABELS = ("yes", "no", "maybe")


def medqa(*args: str, written: Path | None = None) -> float:
    """Seconds `python -m medqa ARGS` took; NaN where `written` (what it writes) is already there."""
    if written is not None and written.exists():
        return float("nan")
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medqa", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"python -m medqa {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def rows(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())}


def scores(answers: dict[str, dict]) -> tuple[float, float]:
    """Accuracy and macro-F1 (the official scorer's, through `medqa.compare`)."""
    truth = np.array([LABELS.index(r["truth"]) for r in answers.values()])
    said = np.array([LABELS.index(r["label"]) for r in answers.values()])
    measured = label_scores(truth, said, len(LABELS))
    return float(measured["acc"]), float(measured["macro_f1"])


def llama_cpp_answers(path: Path, options: list[str], split: str, n: int, threads: int) -> dict[str, str]:
    """llama.cpp's answers to the first `n` questions of `split`, tokenized as medqa's predict
    with `options` (the configs and --data.* settings) tokenizes them for this file."""
    import llama_cpp

    from medqa.cli import cli_for

    dm = cli_for("predict", [*options, "--model.pretrained", str(path), "--data.predict_split", split])[0].datamodule
    dm.setup("predict")
    words = [ids[0] for ids in dm.answer_tokens["label_ids"]]
    llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=threads)
    answers = {}
    for example in dm.examples[dm.predict_split][:n]:
        prompt = list(example.input_ids[: example.answer_pos])
        llm.reset()
        llm.eval(prompt)
        scores = np.asarray(llm.scores[len(prompt) - 1])[words]
        answers[example.id] = LABELS[int(scores.argmax())]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, action="append", help="once or more, as medqa takes it")
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--data", required=True, help="ori_pqal.json (or any --data.source)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--reuse", action="store_true",
                        help="keep what an earlier run into --out wrote (its export and answers): seconds show nan")
    parser.add_argument("--llama_cpp", type=int, default=0, help="questions llama.cpp answers from each file")
    args, passed = parser.parse_known_args()
    common = [*(f for c in args.config for f in ("--config", c)), "--data.source", args.data, "--threads", args.threads,
              "--trainer.logger.init_args.save_dir", str(args.out / "logs"), "--trainer.enable_progress_bar", "false", *passed]

    def reuse(written: Path) -> Path | None:
        return written if args.reuse else None

    seconds = {"export": medqa("export", *common, "--ckpt_path", args.ckpt_path, "--gguf", *args.types,
                               "--out", str(args.out / "export"), written=reuse(args.out / "export"))}
    seconds["adapter"] = medqa("predict", *common, "--ckpt_path", args.ckpt_path, "--data.predict_split", args.split,
                               "--predictions.output_dir", str(args.out / "adapter"),
                               written=reuse(args.out / "adapter" / "predictions.jsonl"))
    ours = rows(args.out / "adapter")
    acc, f1 = scores(ours)
    table = ["| scored with | size (MB) | same answer | largest probability gap | accuracy | macro-F1 | seconds |",
             "|---|---|---|---|---|---|---|",
             f"| the adapter on its base | - | - | - | {acc:.3f} | {f1:.3f} | {seconds['adapter']:.0f} |"]
    llama = []
    for path in sorted((args.out / "export" / "gguf").glob("*.gguf")):
        took = medqa("predict", *common, "--model.pretrained", str(path), "--data.predict_split", args.split,
                     "--predictions.output_dir", str(args.out / path.stem),
                     written=reuse(args.out / path.stem / "predictions.jsonl"))
        theirs = rows(args.out / path.stem)
        same = sum(theirs[i]["label"] == ours[i]["label"] for i in ours)
        gap = max(abs(theirs[i][f"p_{w}"] - ours[i][f"p_{w}"]) for i in ours for w in LABELS)
        acc, f1 = scores(theirs)
        table.append(f"| {path.name} | {path.stat().st_size / 1e6:.1f} | {same}/{len(ours)} ({same / len(ours):.1%}) "
                     f"| {gap:.4f} | {acc:.3f} | {f1:.3f} | {took:.0f} |")
        if args.llama_cpp:
            began = time.perf_counter()
            said = llama_cpp_answers(path, common, args.split, args.llama_cpp, int(args.threads))
            took = time.perf_counter() - began
            alike = sum(said[i] == theirs[i]["label"] for i in said)
            as_adapter = sum(said[i] == ours[i]["label"] for i in said)
            llama.append(f"| {path.name} | {len(said)} | {alike}/{len(said)} | {as_adapter}/{len(said)} | {took:.0f} |")
    if llama:
        table += ["", "| llama.cpp reading | questions | same answer as medqa reading the file | as the adapter | seconds |",
                  "|---|---|---|---|---|", *llama]
    print("\n".join(table))
    print(f"\nexport --gguf {' '.join(args.types)}: {seconds['export']:.0f} s")
    (args.out / "gguf_agreement.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
