"""The model's scoring side: one forward pass gives the answer loss and each label word's
log-probability; validation, test and predict steps; each stage's scores logged once at its
end (accuracy, macro-F1, per-class F1, calibration error, the confusion matrix).

`Scoring` is mixed into `medqa.model.MedQALoRA`, which owns the model, its training hooks and
its checkpoints; it reads the module's `model`, `hidden_states`, `_loss`, label words and
their token ids, its `val_scores` / `test_scores`, and the scoring settings `label_bias` (a
class-prior correction) and `ensemble_dir` (cv's fold adapters, `medqa.ensemble`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from medqa.backends import continuations, decoder_and_head
from medqa.checkpoints import CheckpointError, base_fingerprint
from medqa.ensemble import Ensemble
from medqa.metrics import confusion_figure, format_confusion, label_log_probs


class Scoring:
    """Validation, test and predict for a `LightningModule` that scores label words."""

    def _forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(answer loss, log-probs of the label words) for a batch, from one forward pass (one
        a fold adapter with `--model.ensemble`), with the class-prior correction if set."""
        if self.ensemble is not None:
            loss, logp = self.ensemble.forward(lambda: self._scores(batch))
        else:
            loss, logp = self._scores(batch)
        if self.label_bias is not None:  # a class-prior correction (`medqa.priors`)
            logp = (logp + self.label_bias).log_softmax(-1)
        return loss, logp

    def _scores(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        loss, hidden = self._loss(batch)
        _, head = decoder_and_head(self.model)
        logp = label_log_probs(
            self.hidden_states, head, hidden, batch["input_ids"], batch["answer_pos"], self.label_ids, self.pad_id,
            self.label_first_ids,
        )
        return loss, logp

    def start_ensemble(self, ckpt_path: str | None) -> None:
        """Load and check the folds' adapters of `ensemble` once, before scoring."""
        if self.ensemble_dir is None or self.ensemble is not None:
            return
        if ckpt_path is not None:
            raise CheckpointError(f"--model.ensemble scores the best adapter of each fold in {self.ensemble_dir}; "
                                  f"leave out --ckpt_path ({ckpt_path})")
        if self.rationale_tokens:
            raise CheckpointError("--model.ensemble scores decisions; a rationale needs one adapter (--ckpt_path)")
        trainable = {name: p for name, p in self.named_parameters() if p.requires_grad}
        self.ensemble = Ensemble(Path(self.ensemble_dir), self.lora, {"labels": self.labels, "label_ids": self.label_ids},
                                 base_fingerprint(self.model, self.pretrained), trainable)
        rank_zero_info(f"Scoring with the {len(self.ensemble.members)} fold adapters of {self.ensemble_dir}, "
                       "their label probabilities averaged.")

    def on_validation_start(self) -> None:
        self.start_ensemble(self.trainer.ckpt_path)

    def on_test_start(self) -> None:
        self.start_ensemble(self.trainer.ckpt_path)

    def on_predict_start(self) -> None:
        self.start_ensemble(self.trainer.ckpt_path)

    def _evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        loss, logp = self._forward(batch)
        getattr(self, f"{stage}_scores").add(logp, batch["label"])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=logp.size(0), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        matrix = self._log_stage("test")
        rank_zero_info("Test confusion matrix:\n" + format_confusion(matrix, self.labels))

    def _log_stage(self, stage: str) -> Tensor:
        """Log a stage's accuracy, macro-F1, per-class F1 and calibration error; draw its
        confusion matrix into TensorBoard. Returns the matrix."""
        scores = getattr(self, f"{stage}_scores")
        values, matrix = scores.compute()
        per_class = values.pop(f"{stage}/f1")
        values.update({f"{stage}/f1_{w}": f for w, f in zip(self.labels, per_class)})
        # Already the same on every process (torchmetrics synchronises in compute); sync_dist
        # only tells Lightning so.
        self.log(f"{stage}/acc", values.pop(f"{stage}/acc"), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        if isinstance(self.logger, TensorBoardLogger) and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self.logger.experiment.add_figure(f"{stage}/confusion_matrix",
                                              confusion_figure(scores.confusion, matrix, self.labels), self.global_step)
        return matrix

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        _, logp = self._forward(batch)
        probs = logp.softmax(-1).float().cpu()
        out = {"ids": batch["ids"], "probs": probs, "truth": batch["label"].cpu()}
        if self.rationale_tokens > 0:  # after each scored decision, a request to explain it
            prompts = [batch["input_ids"][i, : int(batch["answer_pos"][i])].tolist() + self.label_ids[d]
                       + self.rationale_suffix[d] for i, d in enumerate(probs.argmax(-1).tolist())]
            out["rationale_ids"] = continuations(self.model, prompts, self.rationale_tokens, self.pad_id,
                                                 self.resolved_backend == "unsloth")
        return out
