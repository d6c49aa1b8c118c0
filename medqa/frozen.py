"""The frozen layers below LoRA, computed once per question (`--model.cache_frozen`).

With LoRA on the top layers only (`--model.lora_layers N`), every layer below the lowest
adapter is frozen: what enters that layer is a function of the question's tokens and the
base alone, the same in every epoch, in validation and in every later command on the same
base. So it is computed once, without gradients, and kept; each step then runs only the
top layers. On SmolLM2-135M (30 layers) with LoRA on the top 2, an epoch of PQA-L costs
about 2/30 of a forward pass plus its backward instead of a whole forward and backward.

The states are kept on disk, one safetensors file a question, named by a digest of its
tokens, in a folder named by a digest of the frozen weights (the embeddings and every layer
below the split, as their bytes), the split layer and the dtype:
`<cache>/frozen/<digest>/<tokens digest>.safetensors`. A later command on the same base and
questions (the fine-tuned `predict` after a zero-shot one, the next fold of `cv`, a resumed
or repeated `fit`) reads them instead of computing them. A file is used only when its
tokens, shape, dtype and the digest of its values are the ones recorded in it; anything else
is computed again and rewritten. Files are written aside and renamed, never half-written.

The forward pass is transformers' Llama decoder's own (`LlamaModel.forward`), cut in two at
the split layer: rotary position embeddings from positions 0..T-1, no attention mask (the
batches are right-padded, so under causal attention no real token sees a pad), each layer,
then the final norm. Pads of an assembled batch get zero states, which are never read.

The last layer runs only where its output is read, when the caller says where (`rows`: the
answer positions in training and scoring): its keys and values for every position, its
queries, attention, output projection and MLP at those rows alone. A layer's output at a
position is read by the layers above it, so only the last one can skip positions; it then
costs about a twelfth of a full layer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = 1  # raise when what a file holds changes for the same names


def run_layers(decoder: Any, hidden: Tensor, layers: Any) -> Tensor:
    """`layers` of a Llama-style decoder over right-padded `hidden` states, as the decoder's
    own forward runs them without a mask."""
    position_ids = torch.arange(hidden.size(1), device=hidden.device).unsqueeze(0)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def last_layer_at(decoder: Any, layer: Any, hidden: Tensor, rows: Tensor) -> Tensor:
    """A Llama decoder layer over right-padded `hidden` (batch, time, width) computed at `rows`
    of the flattened batch x time alone (zeros elsewhere): keys and values at every position,
    the rest at the rows, each row attending to its own sequence up to itself."""
    import sys

    attn, (batch, time, width) = layer.self_attn, hidden.shape
    rotate_half = sys.modules[type(attn).__module__].rotate_half  # the architecture's own
    heads, kv_heads, head_dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    position_ids = torch.arange(time, device=hidden.device).unsqueeze(0)
    cos, sin = decoder.rotary_emb(hidden, position_ids=position_ids)  # (1, time, head_dim)
    normed = layer.input_layernorm(hidden)
    keys = attn.k_proj(normed).view(batch, time, kv_heads, head_dim).transpose(1, 2)
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    values = attn.v_proj(normed).view(batch, time, kv_heads, head_dim).transpose(1, 2)
    b, t = rows // time, rows % time
    queries = attn.q_proj(normed.flatten(0, 1)[rows]).view(-1, heads, head_dim)
    queries = queries * cos[0, t][:, None] + rotate_half(queries) * sin[0, t][:, None]
    out = torch.empty_like(queries)
    for item in b.unique().tolist():  # each sequence's rows attend to that sequence
        mine = (b == item).nonzero().squeeze(1)
        visible = torch.arange(time, device=hidden.device)[None, :] <= t[mine][:, None]  # causal
        out[mine] = torch.nn.functional.scaled_dot_product_attention(
            queries[mine].transpose(0, 1)[None], keys[item : item + 1], values[item : item + 1],
            attn_mask=visible[None, None], scale=attn.scaling, enable_gqa=heads != kv_heads)[0].transpose(0, 1)
    at = hidden.flatten(0, 1)[rows] + attn.o_proj(out.reshape(len(rows), heads * head_dim))
    at = at + layer.mlp(layer.post_attention_layernorm(at))
    return hidden.new_zeros(batch * time, width).index_copy(0, rows, at).view(batch, time, width)


def weights_digest(modules: list[torch.nn.Module], *extra: Any) -> str:
    """A digest of the modules' parameters and buffers (names, shapes, dtypes and bytes) and
    `extra`: what the frozen states depend on."""
    h = hashlib.blake2b(digest_size=16)
    for item in extra:
        h.update(repr(item).encode())
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _values_digest(t: Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy(), digest_size=16).hexdigest()


class FrozenLayers:
    """The decoder of a PEFT model cut at `split`: layers below run once per question (kept in
    `folder`), layers from `split` up run every time.

    Args:
        decoder: The Llama-style decoder (`embed_tokens`, `layers`, `rotary_emb`, `norm`).
        split: The first layer with adapters; the ones below are frozen.
        folder: Where the states are kept; None keeps them in this process only.
    """

    def __init__(self, decoder: Any, split: int, folder: Path | None) -> None:
        self.decoder, self.split, self.folder = decoder, split, folder
        self.memory: dict[str, Tensor] = {}  # without a folder; with one, the files are read as needed
        self.computed = self.read = 0  # questions whose states were computed, read from disk
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_model(cls, decoder: Any, split: int, root: Path | None) -> FrozenLayers:
        """For `decoder` cut at `split`, keeping its states under `root` (None: in memory only)."""
        dtype = next(decoder.parameters()).dtype
        folder = None
        if root is not None:
            below = [decoder.embed_tokens, *decoder.layers[:split], decoder.rotary_emb]
            folder = root / weights_digest(below, FORMAT, split, dtype, torch.__version__)
        return cls(decoder, split, folder)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, rows: Tensor | None = None) -> Tensor:
        """The decoder's last hidden states (after the final norm) of a right-padded batch; with
        `rows` (positions in the flattened batch x time), only there: the rest are zero."""
        lengths = attention_mask.sum(1).tolist()
        sequences = [input_ids[i, :n] for i, n in enumerate(lengths)]
        keys = [hashlib.blake2b(q.cpu().numpy().tobytes(), digest_size=16).hexdigest() for q in sequences]
        states = [self._lookup(k, n) for k, n in zip(keys, lengths)]
        missing = [i for i, s in enumerate(states) if s is None]
        if missing:
            for i, s in zip(missing, self._compute([sequences[i] for i in missing])):
                states[i] = s
                self._keep(keys[i], s)
        hidden = states[0].new_zeros(input_ids.size(0), input_ids.size(1), states[0].size(-1))
        for i, s in enumerate(states):
            hidden[i, : s.size(0)] = s
        top = self.decoder.layers[self.split:]
        if rows is None:
            return self.decoder.norm(run_layers(self.decoder, hidden, top))
        hidden = run_layers(self.decoder, hidden, top[:-1])
        return self.decoder.norm(last_layer_at(self.decoder, top[-1], hidden, rows.unique()))

    @torch.no_grad()
    def _compute(self, rows: list[Tensor]) -> list[Tensor]:
        longest = max(r.numel() for r in rows)
        ids = rows[0].new_zeros(len(rows), longest)
        for i, r in enumerate(rows):
            ids[i, : r.numel()] = r
        hidden = run_layers(self.decoder, self.decoder.embed_tokens(ids), self.decoder.layers[: self.split])
        self.computed += len(rows)
        return [hidden[i, : r.numel()].clone() for i, r in enumerate(rows)]

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def _lookup(self, key: str, length: int) -> Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.folder is None or not self._path(key).is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self._path(key)), framework="pt") as f:
                meta, states = f.metadata() or {}, f.get_tensor("states")
        except (SafetensorError, OSError, ValueError, KeyError):
            return None  # damaged or not ours: computed again and rewritten
        dtype = next(self.decoder.parameters()).dtype
        if (meta.get("tokens") != key or states.dim() != 2 or states.size(0) != length or states.dtype != dtype
                or meta.get("values") != _values_digest(states)):
            return None
        self.read += 1
        return states.to(next(self.decoder.parameters()).device)

    def _keep(self, key: str, states: Tensor) -> None:
        if self.folder is None:
            self.memory[key] = states
            return
        from safetensors.torch import save_file

        cpu = states.detach().cpu().contiguous()
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file({"states": cpu}, tmp, metadata={"tokens": key, "values": _values_digest(cpu)})
            os.replace(tmp, self._path(key))
        except OSError:
            Path(tmp).unlink(missing_ok=True)  # a full disk costs the reuse, not the run


def frozen_layers(model: Any, lora: Any, setting: bool | str, backend: str) -> FrozenLayers | None:
    """The frozen layers of a PEFT `model` with `lora`'s top-layer adapters, computed once
    (`--model.cache_frozen` `setting`), or None where they are not: `auto` where LoRA leaves
    layers below it on the hf backend; `true` there too, and refused elsewhere."""
    from medqa.backends import BackendError, decoder_and_head

    if setting is False:
        return None
    decoder, _ = decoder_and_head(model)
    adapted = lora.layer_indices(len(decoder.layers))
    why = ("LoRA is on every layer (set --model.lora_layers)" if not adapted
           else "the unsloth backend runs its own decoder" if backend != "hf" else "")
    if why:
        if setting is True:
            raise BackendError(f"--model.cache_frozen true: there are no frozen layers to compute once: {why}")
        return None
    from lightning.pytorch.utilities import rank_zero_info

    from medqa.tiny import cache_dir

    frozen = FrozenLayers.for_model(decoder, adapted[0], cache_dir() / "frozen")
    rank_zero_info(f"Frozen layers 0-{adapted[0] - 1} (below LoRA's {len(adapted)}) are computed once per question and "
                   f"kept in {frozen.folder}.")
    return frozen
