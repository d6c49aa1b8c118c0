"""The `auto` memory plan in training (`--model.gradient_checkpointing auto`): the first
training batch chooses it (`medqa.memory.first_plan`), and an out-of-memory error in a step's
forward or backward steps it down (`medqa.memory.fallback`) and retries the batch, the
gradients accumulated before it put back as they were."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from medqa.backends import keep_activations
from medqa.memory import Plan, TrainingOutOfMemory, fallback, first_plan


class PlannedMemory:
    """The memory plan's training hooks for the `LightningModule` (`medqa.model.MedQALoRA`),
    which supplies `_loss`, `_trainable_params` and the settings read here."""

    def _use_plan(self, plan: Plan) -> None:
        keep_activations(self.model, plan.kept_layers())
        self.plan = plan
        rank_zero_info(plan.describe())

    def _next_plan(self) -> Plan | None:
        """The plan an out-of-memory error steps down to; None where there is none to take
        (not `auto`, every layer recomputed already, or DDP)."""
        return fallback(self.plan) if self.plan is not None and self.trainer.world_size == 1 else None

    def _out_of_memory(self, error: str) -> None:
        """Step down to the next `auto` plan after an out-of-memory error in training, or end
        the run saying what to change."""
        nxt = self._next_plan()
        where = f"step {self.global_step}"
        if nxt is None:
            why = ("with every layer's activations recomputed" if self.plan is not None and self.plan.kept == 0
                   else "under DDP, where the processes cannot change plan together" if self.plan is not None
                   else f"with --model.gradient_checkpointing {str(self.gradient_checkpointing).lower()}")
            raise TrainingOutOfMemory(
                f"out of GPU memory at {where} {why}: lower --data.batch_size (and raise "
                f"--trainer.accumulate_grad_batches to keep the step's questions) or --data.max_length"
                + ("" if self.gradient_checkpointing is not False else ", or pass --model.gradient_checkpointing auto")
                + f" ({error.splitlines()[0][:200]})"
            )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rank_zero_info(f"Out of GPU memory at {where} with {self.plan.name()}; retrying the batch with {nxt.name()}.")
        self._use_plan(nxt)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.gradient_checkpointing == "auto" and self.plan is None:
            # The first training batch says how long the data's longest batch can be.
            self._use_plan(first_plan(self.model, self.resolved_backend, self.dtype_name, batch["longest_batch_tokens"],
                                      self._limit_bytes, dequantize=self.keep_dequantized == "auto"))

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        scale = None
        while True:
            # A backward that fails half-way has added to some gradients: keep the ones the
            # earlier batches of this step accumulated (LoRA's, small) to put back before a retry.
            params = self._trainable_params() if self._next_plan() is not None else []
            before = [None if p.grad is None else p.grad.clone() for p in params]
            try:
                loss.backward(*args, **kwargs)
                return
            except torch.OutOfMemoryError as e:
                error = str(e)
            if scale is None:  # what Lightning did to the step's loss (1 / accumulated batches, a loss scale)
                scale = loss.detach() / self._step_loss
            del loss
            for p, grad in zip(params, before):
                p.grad = grad
            self._out_of_memory(error)
            loss = self._loss(self._batch, train=True)[0] * scale
