"""`--model.gradient_checkpointing auto`: how many decoder layers may keep their activations
for backward instead of recomputing them, from the card's free memory and the longest
training batch the data can produce.

Recomputing a layer's activations (gradient checkpointing) costs about a third more compute
per step; keeping them costs memory that grows with the batch's tokens. Three kinds of plan:

- every layer keeps its activations: no recomputation, the fastest when it fits;
- some layers keep theirs, evenly spaced, the rest are recomputed;
- every layer is recomputed (on the unsloth backend, Unsloth's variant, which also moves the
  saved layer inputs to the CPU): the least memory.

The estimate of one layer's activations is a model of the Llama decoder layer fitted to a
measured run: about 5 x hidden + 3 x intermediate values of the compute dtype per token.
On one NVIDIA H200 (8B shape, PQA-L, batch 8, longest batch about 5,840 tokens) a fit with
every layer kept peaked at 27.27 GiB and one with every layer recomputed at 7.45 GiB:
0.62 GiB a kept layer, which this formula puts at 0.69 GiB (the first formula, 4 x hidden +
2 x intermediate, gave 0.49 and under-estimated the plan by 5 GiB). A margin covers small errors, and an
out-of-memory error in a training step steps down to the next plan (`fallback`) and retries
the batch instead of ending the run (in a single process: under DDP every process would
have to change plan at the same backward, so there the error ends the run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from medqa.backends import decoder_and_head
from medqa.dequantize import extra_bytes, keep_dequantized
from medqa import memory_cpu
from medqa.dtypes import compute_dtype

GiB = 2**30
MARGIN_BYTES = 2 * GiB  # allocator fragmentation, CUDA workspaces, the loss and head at a few positions
MARGIN_FRACTION = 0.10


class TrainingOutOfMemory(RuntimeError):
    """Out of GPU memory with every layer already recomputed (or under DDP)."""


@dataclass(frozen=True)
class Plan:
    """Which decoder layers keep their activations, and what that is expected to need.

    Attributes:
        layers: Decoder layers in the model.
        kept: Layers that keep their activations (not recomputed), evenly spaced.
        per_layer_bytes: Activations one kept layer holds for the longest batch.
        base_bytes: What every plan needs: memory in use after loading, LoRA gradients and
            optimizer state, and one layer's activations while it is recomputed.
        free_bytes: Free card memory the plan was sized for; None where nothing was measured
            (no GPU: there every layer keeps its activations).
        limited: `free_bytes` is `--model.memory_limit_gib`, not all the card had free.
        first: The lowest layer the plan covers: layers below it hold no LoRA and keep nothing.
        cpu: Planned for the machine's available memory (`medqa.memory_cpu`), not a card's.
    """

    layers: int
    kept: int
    per_layer_bytes: int
    base_bytes: int
    free_bytes: int | None
    limited: bool = False
    first: int = 0
    cpu: bool = False

    @property
    def estimate_bytes(self) -> int:
        return self.base_bytes + self.kept * self.per_layer_bytes

    def kept_layers(self) -> list[int]:
        """The kept layers' indices, spread evenly over the stack."""
        if self.kept <= 0:
            return []
        return [self.first + (k + 1) * self.layers // self.kept - 1 for k in range(self.kept)]

    def name(self) -> str:
        if self.kept >= self.layers:
            return "no recomputation (every layer keeps its activations)"
        if self.kept == 0:
            return "every layer recomputed in backward"
        return f"{self.kept} of {self.layers} layers keep their activations, the other {self.layers - self.kept} are recomputed"

    def describe(self) -> str:
        estimate = f"about {self.estimate_bytes / GiB:.1f} GiB"
        if self.free_bytes is None:
            return f"Gradient checkpointing auto: {self.name()}; no memory limit could be read to plan for."
        where = "of available memory" if self.cpu else "the card had free"
        return (f"Gradient checkpointing auto: {self.name()}; {estimate} at the longest batch "
                f"({self.per_layer_bytes / GiB:.2f} GiB a kept layer), of {self.free_bytes / GiB:.1f} GiB "
                + ("allowed by --model.memory_limit_gib." if self.limited else f"{where}."))


def activation_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """Activations one Llama-style decoder layer keeps for backward, per token, when it is not
    recomputed: the residual and normed inputs, queries, keys, values and attention output
    (about 5 x hidden) and the MLP's gate, up and gated product (3 x intermediate); a little
    above the 8B shape's measured 0.62 GiB a layer (see the module's docstring)."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
    return (5 * hidden + 3 * intermediate) * dtype_bytes


def choose(layers: int, per_layer_bytes: int, base_bytes: int, free_bytes: int | None,
           limit_bytes: int | None = None, margin_bytes: int = MARGIN_BYTES) -> Plan:
    """The plan that keeps the most layers' activations and still fits `free_bytes` (or
    `limit_bytes`, where smaller) with the margin; every layer keeps them where nothing was
    measured (`free_bytes` None)."""
    if free_bytes is None:
        return Plan(layers, layers, per_layer_bytes, base_bytes, None)
    limited = limit_bytes is not None and limit_bytes < free_bytes
    available = limit_bytes if limited else free_bytes
    usable = available * (1 - MARGIN_FRACTION) - margin_bytes - base_bytes
    kept = int(usable // per_layer_bytes) if per_layer_bytes > 0 else layers
    return Plan(layers, max(0, min(layers, kept)), per_layer_bytes, base_bytes, available, limited)


def fallback(plan: Plan) -> Plan | None:
    """The next plan after an out-of-memory error: half the kept layers, then none; None when
    every layer is already recomputed."""
    if plan.kept == 0:
        return None
    return replace(plan, kept=plan.kept // 2)


def limit_memory(limit_gib: float | None) -> int | None:
    """Hold this process's CUDA allocator to `limit_gib` (`--model.memory_limit_gib`: a card
    shared with other work, or a smaller card's plan tried on a larger one); past it an
    allocation fails as on a card of that size. Without a GPU the plan keeps within it, and
    nothing else holds the process to it. The limit in bytes; None without one."""
    if limit_gib is None:
        return None
    if not torch.cuda.is_available():
        return int(limit_gib * GiB)
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    limit = min(int(limit_gib * GiB), total)
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    return limit


def plan_for(model: Any, backend: str, dtype: str, longest_batch_tokens: int, limit_bytes: int | None = None,
             extra_bytes: int = 0) -> Plan:
    """The plan for this process's card (or its `limit_memory`) and the longest training
    batch, for a loaded PEFT model (every layer checkpointed so far), with `extra_bytes` more
    in use than now (a base to be kept dequantized)."""
    decoder, _ = decoder_and_head(model)
    layers, config = len(decoder.layers), model.get_base_model().config
    if not torch.cuda.is_available():
        adapted, per_layer, base = memory_cpu.needs(model, compute_dtype(dtype), longest_batch_tokens)
        if limit_bytes is not None:  # the limit is the whole process's: what it holds already counts
            limit_bytes -= memory_cpu.resident_bytes()
        plan = choose(len(adapted), per_layer, base, memory_cpu.available_bytes(), limit_bytes, memory_cpu.MARGIN_BYTES)
        return replace(plan, first=adapted[0], cpu=True)
    per_layer = activation_bytes_per_token(config, compute_dtype(dtype).itemsize) * longest_batch_tokens
    device = torch.cuda.current_device()
    free, _ = torch.cuda.mem_get_info(device)
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # Checkpointed layers keep their inputs: on the card with transformers, in CPU memory
    # with Unsloth's offloaded variant.
    inputs = 0 if backend == "unsloth" else layers * longest_batch_tokens * config.hidden_size * compute_dtype(dtype).itemsize
    # In use after loading, LoRA gradients and AdamW's two moments, one recomputed layer, the inputs.
    base = torch.cuda.memory_allocated(device) + extra_bytes + 3 * lora + per_layer + inputs
    return choose(layers, per_layer, base, free + torch.cuda.memory_reserved(device), limit_bytes)


def first_plan(model: Any, backend: str, dtype: str, longest_batch_tokens: int, limit_bytes: int | None,
               dequantize: bool) -> Plan:
    """The plan for `fit`'s first batch. With `dequantize` (`--model.keep_dequantized auto`) a
    4-bit base is first kept dequantized where every layer still keeps its activations with it,
    on a GPU only: a CPU plan counts the machine's memory, which the dequantized base would take."""
    plan = partial(plan_for, model, backend, dtype, longest_batch_tokens, limit_bytes)
    chosen = plan()
    if dequantize and chosen.free_bytes is not None and not chosen.cpu and chosen.kept == chosen.layers:
        extra = extra_bytes(model)
        if extra and plan(extra).kept == chosen.layers:
            keep_dequantized(model, "--model.keep_dequantized auto: every layer still keeps its activations")
            chosen = plan()
    return chosen


def micro_batches(batch_size: int, accumulate: int) -> list[tuple[int, int]]:
    """(questions a micro-batch, micro-batches a step) with the configured questions an
    optimizer step, the largest micro-batch first: 8 x 4 gives 32 x 1, 16 x 2 and 8 x 4."""
    return [(batch_size * k, accumulate // k) for k in range(accumulate, 0, -1) if accumulate % k == 0]


def grow(batch_size: int, accumulate: int, plan: Callable[[int], Plan]) -> tuple[int, int, Plan]:
    """The largest micro-batch of `micro_batches` whose `plan` keeps every layer's activations,
    with its accumulation and plan; the configured pair where none does. A micro-batch
    launches about the same kernels whatever its size (some 6,000 on the 8B shape), so more
    questions pay for them once: on one H200 (8B, NF4, PQA-L, `configs/lora.yaml`) 16 x 1
    trained at 1.40-1.64x the tokens/s of 8 x 2, both without recomputation; recomputing
    to fit a larger micro-batch costs more than that gains."""
    for micro, steps in micro_batches(batch_size, accumulate):
        chosen = plan(micro)
        if chosen.kept >= chosen.layers or steps == accumulate:
            return micro, steps, chosen
    raise AssertionError("micro_batches always ends with the configured pair")


def smaller_micro_batches(batch_size: int, accumulate: int) -> list[tuple[int, int]]:
    """(questions a micro-batch, micro-batches a step) with the configured questions an
    optimizer step, from the configured micro-batch down to one question: 8 x 1 gives 8 x 1,
    4 x 2, 2 x 4 and 1 x 8."""
    total = batch_size * accumulate
    return [(m, total // m) for m in range(batch_size, 0, -1) if total % m == 0]


def shrink(batch_size: int, accumulate: int, plan: Callable[[int], Plan]) -> tuple[int, int, Plan]:
    """Without a GPU: the largest micro-batch of `smaller_micro_batches` whose `plan` keeps
    every layer's activations, else one question with its partial plan (`medqa.memory_cpu`
    says why a smaller micro-batch comes before recomputation there)."""
    for micro, steps in smaller_micro_batches(batch_size, accumulate):
        chosen = plan(micro)
        if chosen.kept >= chosen.layers:
            return micro, steps, chosen
    return micro, steps, chosen


class MicroBatch(L.Callback):
    """`fit` with `--model.gradient_checkpointing auto` (and `--model.grow_micro_batch true`):
    before the first batch, train on the largest micro-batch that keeps every layer's
    activations (`grow` on a GPU; `shrink` without one, where the configured one does not fit
    the machine's memory) with the configured questions an optimizer step, by changing
    `data.batch_size` and the trainer's `accumulate_grad_batches` together. Every process
    takes the smallest choice of all. A resume keeps the micro-batch its checkpoint trained
    with (its state), so the resumed order is the same."""

    def __init__(self) -> None:
        self.trainer: L.Trainer | None = None
        self.configured: tuple[int, int] | None = None
        self.chosen: tuple[int, int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit" or dm is None or not hasattr(dm, "micro_batch_tokens"):
            return
        self.trainer, self.configured = trainer, (dm.batch_size, trainer.accumulate_grad_batches)
        if trainer.ckpt_path is not None:
            return  # a resume: `load_state_dict` puts back what the checkpoint trained with
        micro = self.choose(trainer, pl_module)
        micro = int(trainer.strategy.reduce(torch.tensor(micro, device=pl_module.device), reduce_op="min"))
        self._apply(trainer, micro)

    def choose(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """This process's micro-batch: `grow` on its card's free memory, `shrink` on the
        machine's without a GPU."""
        with trainer.strategy.tensor_init_context():  # as Lightning calls it; it loads once
            pl_module.configure_model()
        model, backend, dtype, limit = pl_module.model, pl_module.resolved_backend, pl_module.dtype_name, pl_module._limit_bytes
        tokens = trainer.datamodule.micro_batch_tokens
        pick = grow if torch.cuda.is_available() else shrink
        return pick(*self.configured, lambda m: plan_for(model, backend, dtype, tokens(m), limit))[0]

    def _apply(self, trainer: L.Trainer, micro: int) -> None:
        batch, accumulate = self.configured
        if micro == batch:
            return
        trainer.datamodule.batch_size = micro
        trainer.accumulate_grad_batches = batch * accumulate // micro
        self.chosen = (micro, trainer.accumulate_grad_batches)
        rank_zero_info(f"Micro-batch auto: {micro} questions x {self.chosen[1]} accumulated "
                       f"(configured {batch} x {accumulate}, the same {batch * accumulate} an optimizer step): "
                       "the largest that keeps every layer's activations (the plan below says if one question does not).")

    @property
    def state_key(self) -> str:
        return "MicroBatch"  # one key whatever chose it

    def state_dict(self) -> dict[str, Any]:
        return {"configured": self.configured, "chosen": self.chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Train on the checkpoint's micro-batch where the configured pair is the same (another
        configuration is left to the sampler's check, which names what changed)."""
        if self.configured is None or not isinstance(state, dict) or not isinstance(state.get("chosen"), (list, tuple)):
            return
        micro = state["chosen"][0] if state["chosen"] else None
        allowed = [m for m, _ in micro_batches(*self.configured) + smaller_micro_batches(*self.configured)]  # untrusted
        if state.get("configured") in (self.configured, list(self.configured)) and type(micro) is int and micro in allowed:
            self._apply(self.trainer, micro)
