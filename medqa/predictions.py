"""Writing `predict` results: `predictions.json` in the official scorer's format and a
JSON Lines file with each question's label probabilities."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from medqa.results import write_json, write_result


class PartialPredictions(RuntimeError):
    """A predict run that did not answer every question of its split once."""


class PredictionWriter(BasePredictionWriter):
    """Writes `predictions.json` (`{id: label}`) and `predictions.jsonl` to the run directory.
    Under DDP the processes' answers are gathered and written once, each question once.

    Args:
        output_dir: Where to write; by default the run's log directory.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        out = Path(self.output_dir or trainer.log_dir or ".")  # log_dir is collective: every process asks
        if trainer.world_size > 1:  # each process answered its share: the first one writes them all
            import torch.distributed as dist

            shares: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(shares, predictions)
            if not trainer.is_global_zero:
                return
            predictions = [batch for share in shares for batch in share]
        ids = [i for batch in predictions for i in batch["ids"]]
        words = list(pl_module.labels)
        probs = torch.cat([batch["probs"] for batch in predictions]) if predictions else torch.empty(0, len(words))
        truth = torch.cat([batch["truth"] for batch in predictions]) if predictions else torch.empty(0)
        expected = len(trainer.predict_dataloaders.dataset)
        if len(ids) != expected or len(set(ids)) != len(ids):
            raise PartialPredictions(
                f"predict produced {len(ids)} answers ({len(set(ids))} distinct) for the {expected} questions of the split; "
                "a prediction file must answer every question once, so none was written. Leave out "
                "--trainer.limit_predict_batches (or choose a smaller split with --data.predict_split)")

        # Batches come longest first; write in the data's order.
        position = {e.id: i for i, e in enumerate(trainer.predict_dataloaders.dataset)}
        rows = sorted(range(len(ids)), key=lambda i: position[ids[i]])
        ids, probs, truth = [ids[i] for i in rows], probs[rows], truth[rows]

        out.mkdir(parents=True, exist_ok=True)
        json_path, jsonl_path = out / "predictions.json", out / "predictions.jsonl"
        for path in (json_path, jsonl_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; remove it or pass --predictions.output_dir elsewhere")
        rationales = None
        if predictions and "rationale_ids" in predictions[0]:
            generated = [r for batch in predictions for r in batch["rationale_ids"]]
            rationales = [trainer.datamodule.decode(generated[i]) for i in rows]
        labels = [words[i] for i in probs.argmax(-1).tolist()]
        lines = []
        for n, (qid, label, p, t) in enumerate(zip(ids, labels, probs.tolist(), truth.tolist())):
            row = {"id": qid, "label": label, **{f"p_{w}": round(v, 6) for w, v in zip(words, p)}}
            row["truth"] = words[t]
            if rationales is not None:
                row["rationale"] = rationales[n]
            lines.append(json.dumps(row) + "\n")
        # Each file whole or absent: the official scorer never reads half a file.
        write_result(jsonl_path, "".join(lines))
        write_json(json_path, dict(zip(ids, labels)))
        rank_zero_info(f"Wrote {len(ids)} predictions to {json_path} (probabilities in {jsonl_path.name})")
