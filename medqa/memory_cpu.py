"""`--model.gradient_checkpointing auto` without a GPU: the plan from the machine's available
memory instead of a card's.

Two things differ from the GPU plan (`medqa.memory`):
- What a layer keeps is measured, not modelled: one adapted decoder layer runs forward once
  over a short random sequence while `saved_tensors_hooks` count what autograd keeps for
  backward (the model's own weights left out), giving bytes a token for this model, dtype and
  attention kernel. On SmolLM2-135M in float32 on 2 CPU cores the whole forward of a batch of 8
  x 889 tokens with LoRA on all 30 layers held 13.9 GiB, 65 KiB a token and layer: twice what
  the GPU model's 5 x hidden + 3 x intermediate values give, since the CPU's kernels are not
  fused.
- A smaller micro-batch comes first (`MicroBatch` shrinks it, accumulating more, so an
  optimizer step keeps its questions): on a CPU the products of a micro-batch are large
  enough at any size, so it costs no speed, while each recomputed layer costs a third more
  compute. Layers are recomputed only where one question's activations do not fit.

What a process holds at the peak is more than autograd keeps: glibc's malloc keeps freed
blocks in its heap and they fragment. On SmolLM2-135M's longest batch (8 x 889 tokens, LoRA on
all 30 layers, float32, 2 cores) `fit`'s first step peaked 1.7x above what the probe counts
(15.3 against 9.0 GiB; 1.0-1.4x in a process that ran nothing before the step, but 1.70-1.91x
there too for one question of 512 tokens through 30 adapted layers, `tests/memory_step.py`
run 6 times). Holding
malloc to return every block above 128 KiB when freed (`mallopt`) brought it to 1.0x, but
cost 28% of a forward pass's speed and 44% of a training step's (bfloat16, same machine): the
plan counts `ALLOCATOR_OVERHEAD`, above the largest ratio seen, instead.

Available memory is /proc/meminfo's MemAvailable, or a cgroup's limit less its use where
that is lower (a container), or `--model.memory_limit_gib`, whichever is least.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

GiB = 2**30
PROBE_TOKENS = 64
MARGIN_BYTES = GiB // 2  # the loss and head, the optimizer's temporaries
ALLOCATOR_OVERHEAD = 2.0  # peak resident memory over what autograd keeps (the module's docstring)


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or less where a cgroup (v2) limits it;
    None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc cannot tell)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def saved_bytes_per_token(layer: torch.nn.Module, hidden_size: int, dtype: torch.dtype, rotary: Any) -> int:
    """What `layer` keeps for backward per token, measured over `PROBE_TOKENS` random tokens
    (its own parameters left out: they are in memory anyway)."""
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
            kept.append(t)  # alive until counted, so that no later tensor reuses its address
        # autograd keeps nothing: backward never runs, and a hook that returns the tensor itself
        # leaves a reference to each weight that no collector frees (the base then stays in
        # memory after `medqa.dequantize` replaces it)

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("the memory probe keeps nothing for backward")

    x = torch.randn(1, PROBE_TOKENS, hidden_size, dtype=dtype, requires_grad=True)
    position_ids = torch.arange(PROBE_TOKENS).unsqueeze(0)
    # `forward` itself: as a kept layer (its __call__ would checkpoint), and without its hooks
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = layer.forward(x, attention_mask=None, position_ids=position_ids,
                            position_embeddings=rotary(x, position_ids=position_ids))
    del out
    kept.clear()
    return -(-sum(seen.values()) // PROBE_TOKENS)


def adapted_layers(model: Any) -> list[int]:
    """The decoder layers that hold trainable (LoRA) weights: only they keep activations, since
    nothing below the lowest of them needs a gradient."""
    from medqa.backends import decoder_and_head

    decoder, _ = decoder_and_head(model)
    adapted = [i for i, layer in enumerate(decoder.layers) if any(p.requires_grad for p in layer.parameters())]
    return adapted or list(range(len(decoder.layers)))


def needs(model: Any, dtype: torch.dtype, longest_batch_tokens: int) -> tuple[list[int], int, int]:
    """(the adapted layers, what one of them keeps at the longest batch, what every plan needs
    besides: LoRA's gradients and AdamW's moments, one recomputed layer, the recomputed layers'
    inputs), in bytes, for `medqa.memory`'s plan without a GPU."""
    from medqa.backends import decoder_and_head

    decoder, _ = decoder_and_head(model)
    adapted = adapted_layers(model)
    hidden = model.get_base_model().config.hidden_size
    per_token = saved_bytes_per_token(decoder.layers[adapted[0]], hidden, dtype, decoder.rotary_emb)
    per_layer = int(per_token * ALLOCATOR_OVERHEAD) * longest_batch_tokens
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    inputs = len(adapted) * longest_batch_tokens * hidden * dtype.itemsize
    return adapted, per_layer, 3 * lora + per_layer + inputs


class ReturnFreedMemory(L.Callback):
    """Without a GPU: hand memory freed by the batches back to the system (glibc's
    `malloc_trim`) once the process holds `GROWTH` times what it held after the last time.
    A batch's activations are blocks of 100 KB to tens of MB whose sizes change with its
    length; glibc raises its mmap threshold after the first large free, serves the later ones
    from its heap, and the freed gaps fragment it. On SmolLM2-135M with LoRA on the top 2
    layers (frozen states read from the cache, 2 epochs, bf16, AMD EPYC with AVX-512 BF16, 2
    cores), the fit's peak resident memory was 5.3 GiB without trimming (5,600-6,700 tokens/s
    over two runs), 3.6 GiB at a growth of 2.0 (5,850), 2.9 GiB at 1.5 (5,070), 2.6 GiB at
    1.25 (5,100) and 2.3 GiB trimming after every batch (5,200): each trim costs the pages
    faulted in again. Fixing the threshold instead (`MALLOC_MMAP_THRESHOLD_`) held 2.0 GiB at
    half the speed."""

    GROWTH = 1.5

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        self.trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None  # glibc only
        self.floor: int | None = None
        self.on_cpu = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a GPU's activations are not the host's: nothing to hand back there
        self.on_cpu = trainer.strategy.root_device.type == "cpu"

    def _after_batch(self) -> None:
        if self.trim is None or not self.on_cpu:
            return
        held = resident_bytes()
        if self.floor is None or held > self.floor * self.GROWTH:
            if self.floor is not None:
                self.trim(0)
            self.floor = resident_bytes()

    def on_train_batch_end(self, *args: Any) -> None:
        self._after_batch()

    def on_validation_batch_end(self, *args: Any) -> None:
        self._after_batch()

    def on_test_batch_end(self, *args: Any) -> None:
        self._after_batch()

    def on_predict_batch_end(self, *args: Any) -> None:
        self._after_batch()
