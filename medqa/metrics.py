"""Label-token scoring and the torchmetrics collection.

A question is scored by one forward pass: the log-probability of each label word
(yes / no / maybe) at the answer position, computed from the hidden states there. Only the
label tokens' rows of the output projection are used when every label is one token; a
label of several tokens is scored as a whole word (the sum of its tokens' log-probs), with
one more pass for its continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import ConfusionMatrix, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassF1Score


HiddenFn = Callable[[Tensor, Tensor], Tensor]
"""(input_ids, attention_mask) -> last hidden states (batch, time, hidden)."""


def answer_loss(hidden: Tensor, head: torch.nn.Module, loss_pos: Tensor, loss_targets: Tensor,
                weight: Tensor | None = None, smoothing: float = 0.0, labels: Tensor | None = None,
                decision_pos: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over the answer tokens, projecting only those positions.

    `loss_pos` indexes the flattened (batch * time) positions whose next token is an answer
    token, `loss_targets` holds those tokens; both come from `collate`, so selecting them
    needs no device-to-host sync (a boolean mask would). `weight`, one per example, makes it
    the weighted mean (each answer token weighs what its example does).

    `smoothing` > 0 is label smoothing among the labels: where the next token is the decision
    (a position of `decision_pos` whose target is one of `labels`, the label words' first
    tokens), the target gives that share of its weight to the other labels' words, equally,
    instead of keeping all of it on the gold one. Other answer tokens keep their one target.
    """
    logits = head(hidden.flatten(0, 1)[loss_pos]).float()
    if weight is None and not smoothing:
        return F.cross_entropy(logits, loss_targets)
    nll = F.cross_entropy(logits, loss_targets, reduction="none")
    if smoothing:
        label_nll = logits.logsumexp(-1, keepdim=True) - logits[:, labels]  # (answer tokens, labels)
        gold = labels[None, :] == loss_targets[:, None]
        others = (label_nll * ~gold).sum(-1) / (len(labels) - 1)
        decision = torch.isin(loss_pos, decision_pos) & gold.any(-1)
        nll = torch.where(decision, (1 - smoothing) * nll + smoothing * others, nll)
    if weight is None:
        return nll.mean()
    w = weight.to(logits.device)[loss_pos // hidden.size(1)]
    return (nll * w).sum() / w.sum()


def _rows(hidden: Tensor, pos: Tensor) -> Tensor:
    return hidden[torch.arange(hidden.size(0), device=hidden.device), pos]


def label_log_probs(
    hidden_fn: HiddenFn,
    head: torch.nn.Module,
    hidden: Tensor,
    input_ids: Tensor,
    answer_pos: Tensor,
    label_ids: Sequence[Sequence[int]],
    pad_id: int,
    first_ids: Tensor | None = None,
) -> Tensor:
    """Whole-word log-probabilities (batch, len(label_ids)) of each label at `answer_pos`.

    `hidden` is the hidden states of `input_ids` (which may hold the gold answer after the
    prompt: only positions before `answer_pos` are read). `first_ids`, the labels' first
    tokens already on `hidden`'s device, saves a copy to the GPU that would wait for it.
    """
    h = _rows(hidden, answer_pos - 1)
    if all(len(ids) == 1 for ids in label_ids):
        first = torch.tensor([ids[0] for ids in label_ids], device=h.device) if first_ids is None else first_ids
        # Only the label rows: the shared normaliser cancels in the softmax over labels.
        return F.linear(h, head.weight[first]).float().log_softmax(-1)

    first_logp = head(h).float().log_softmax(-1)
    scores = []
    for ids in label_ids:
        score = first_logp[:, ids[0]]
        if len(ids) > 1:
            score = score + _continuation_log_prob(hidden_fn, head, input_ids, answer_pos, ids, pad_id)
        scores.append(score)
    return torch.stack(scores, dim=-1)


def _continuation_log_prob(
    hidden_fn: HiddenFn, head: torch.nn.Module, input_ids: Tensor, answer_pos: Tensor,
    ids: Sequence[int], pad_id: int,
) -> Tensor:
    """log P(ids[1:] | prompt, ids[0]) for each row: the prompt followed by the label word."""
    batch, n = input_ids.size(0), len(ids)
    width = int(answer_pos.max()) + n
    seq = torch.full((batch, width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(seq)
    word = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
    for i, p in enumerate(answer_pos.tolist()):
        seq[i, :p] = input_ids[i, :p]
        seq[i, p : p + n] = word
        mask[i, : p + n] = 1
    hidden = hidden_fn(seq, mask)
    total = torch.zeros(batch, device=input_ids.device)
    for j in range(1, n):
        logp = head(_rows(hidden, answer_pos - 1 + j)).float().log_softmax(-1)
        total = total + logp[:, ids[j]]
    return total


def classification_metrics(prefix: str, n: int) -> MetricCollection:
    """Accuracy and macro-F1 (the official PubMedQA pair) and per-class F1 over `n` labels,
    for one stage."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=n, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes=n, average="macro"),
            "f1": MulticlassF1Score(num_classes=n, average="none"),
        },
        prefix=prefix,
    )


class StageScores(torch.nn.Module):
    """One stage's scores (val or test): accuracy, macro- and per-class F1, the confusion
    matrix and the calibration error of the label probabilities (10 bins, L1).

    Batches are kept on the device and given to the metrics once, when the stage ends:
    torchmetrics' per-batch updates check their arguments and count with `bincount`, and
    each of those waits for the GPU. On an H200, with 11 such waits a batch, the GPU sat
    idle for 12% of scoring.
    """

    def __init__(self, stage: str, n: int) -> None:
        super().__init__()
        self.metrics = classification_metrics(f"{stage}/", n)
        self.confusion = ConfusionMatrix(task="multiclass", num_classes=n)
        self.calibration = MulticlassCalibrationError(num_classes=n, n_bins=10, norm="l1")
        self._batches: list[tuple[Tensor, Tensor]] = []

    def add(self, logp: Tensor, labels: Tensor) -> None:
        """A batch's label log-probabilities (batch, n) and gold label indices."""
        self._batches.append((logp.detach(), labels))

    def compute(self) -> tuple[dict[str, Tensor], Tensor]:
        """(the metrics by name, the confusion matrix) over the batches added, synchronised
        across processes; then starts the stage afresh."""
        if self._batches:
            logp, labels = (torch.cat(t) for t in zip(*self._batches))
            self._batches = []
            preds = logp.argmax(-1)
            self.metrics.update(preds, labels)
            self.confusion.update(preds, labels)
            self.calibration.update(logp.float().exp(), labels)
        values, matrix = self.metrics.compute(), self.confusion.compute()
        values[f"{self.metrics.prefix}ece"] = self.calibration.compute()
        for metric in (self.metrics, self.confusion, self.calibration):
            metric.reset()
        return values, matrix


def confusion_figure(metric: ConfusionMatrix, matrix: Tensor, labels: Sequence[str]) -> Any:
    """`metric`'s computed `matrix` as a matplotlib figure (rows: truth, columns: prediction)."""
    fig, ax = metric.plot(val=matrix.cpu(), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    return fig


def format_confusion(matrix: Tensor, labels: Sequence[str]) -> str:
    """The confusion matrix as a small text table (rows: truth, columns: prediction)."""
    width = max(len(w) for w in labels) + 2
    lines = ["truth \\ pred".ljust(14) + "".join(w.rjust(width) for w in labels)]
    for w, row in zip(labels, matrix.tolist()):
        lines.append(w.ljust(14) + "".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)


def write_hparams(logger: Any, settings: dict[str, Any], metric_tags: list[str]) -> None:
    """Write `settings` to TensorBoard's HPARAMS tab, tied to the scalars `metric_tags`.

    Lightning's `log_hyperparams(params, metrics)` would also log each metric's starting
    value as a point of its curve; this writes the HPARAMS summaries alone.
    """
    from torch.utils.tensorboard.summary import hparams

    plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in settings.items()}
    writer = logger.experiment._get_file_writer()
    for summary in hparams(plain, dict.fromkeys(metric_tags, 0.0)):
        writer.add_summary(summary)
