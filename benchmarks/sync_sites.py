"""Where a training step makes the host wait for the GPU: a medqa command run in this process
with PyTorch's sync debug mode on for the training batches after the warm-up. Prints each
Python stack that synchronised, with how many times it did, most frequent first.

    source .gpukit/activate.sh   # on the lent GPU machine
    python benchmarks/sync_sites.py --after 8 -- fit --config configs/lora.yaml \\
        --model.pretrained /tmp/llama-8b --data.source .gpudata/ori_pqal.json --trainer.max_steps 20

A step with no site between the warm-up and the end never stops the host. Sites at log steps
(every `trainer.log_every_n_steps`) are the logger reading the loss.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import traceback
import warnings
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: another medqa can be measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--after", type=int, default=8, help="training batches to leave out first (warm-up)")
    p.add_argument("--frames", type=int, default=8, help="innermost Python frames that name a site")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the medqa command and its arguments")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    from medqa.backends import import_unsloth_first

    import_unsloth_first(command)
    import lightning as L
    import torch

    import medqa.cli

    sites: collections.Counter[tuple[str, ...]] = collections.Counter()
    batches = [0, 0]  # training batches seen, of them watched

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches[0] += 1
            if batches[0] > args.after:
                batches[1] += 1
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode("warn")

        def on_train_end(self, trainer, pl_module):
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        sites[tuple(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-args.frames:])] += 1

    shown, warnings.showwarning = warnings.showwarning, record
    warnings.simplefilter("always")
    instantiate = medqa.cli.MedQACLI._instantiate_trainer

    @functools.wraps(instantiate)
    def with_watch(self, config, callbacks):
        return instantiate(self, config, [*callbacks, Watch()])

    medqa.cli.MedQACLI._instantiate_trainer = with_watch
    medqa.cli.main(command)
    print(f"\nHost syncs in {batches[1]} training batches after the first {args.after}: {sum(sites.values())} "
          f"at {len(sites)} sites")
    for stack, n in sites.most_common():
        print(f"\n{n} x")
        for frame in stack:
            print(f"    {frame}")


if __name__ == "__main__":
    main()
