"""Run by test_ddp.py under torchrun (2 processes, CPU, gloo): for each `--model.nonfinite`
mode named (`skip,error`: one fit after the other, in the same processes and process group),
process 1's third training batch gets a NaN loss, process 0's stays finite. Writes each
outcome to `<root>/result-<mode>-<rank>.json`; exits 3 on the FloatingPointError of `error`.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_model import PoisonOneBatch, answers  # noqa: E402

from medqa.data import QADataModule  # noqa: E402
from medqa.model import MedQALoRA  # noqa: E402


def main() -> None:
    modes, root = sys.argv[1].split(","), Path(sys.argv[2])
    for mode in modes:
        fit(mode, root)


def fit(mode: str, root: Path) -> None:
    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, dtype="float32", lora_r=4,
                       answer_tokens=answers(), gradient_checkpointing=False, nonfinite=mode)
    data = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512, batch_size=4)
    poison = PoisonOneBatch(at=2).hooks()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=[poison] if int(os.environ["RANK"]) == 1 else [])
    result = root / f"result-{mode}-{os.environ['RANK']}.json"
    try:
        trainer.fit(module, datamodule=data)
    except FloatingPointError as e:
        result.write_text(json.dumps({"error": str(e)}))
        sys.exit(3)
    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    result.write_text(json.dumps({"skipped": module.skipped_batches, "steps": trainer.global_step, "finite": finite}))


if __name__ == "__main__":
    main()
