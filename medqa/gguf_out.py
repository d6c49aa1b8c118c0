"""`export --gguf f16|q8_0`: the merged model as one GGUF file, the format llama.cpp, Ollama
and LM Studio run, and an Ollama `Modelfile` beside it.

The file is written with the `gguf` package's writer and its tensor-name map for the Llama
architecture, as llama.cpp's `convert_hf_to_gguf.py` writes one: the query and key
projections in llama.cpp's row order, the norms in float32, the matrices in float16 or Q8_0,
the tokenizer as byte-level BPE tokens and merges, the chat template, and medqa's prompt and
label words as `medqa.*` metadata. It streams one tensor at a time, so writing the 8B model
holds one matrix beside the merged model, not a second copy of it.

K-quants (q4_k_m and the like) need llama.cpp's own quantizer; `--gguf` says so in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

TYPES = ("f16", "q8_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1", "q5_k_s",
            "q5_k_m", "q6_k", "iq4_xs", "bf16", "f32")


class GGUFExportError(ValueError):
    """A model or option that `--gguf` cannot write, with what to do instead."""


def check_type(kind: str) -> str:
    """`kind` lower-cased if the gguf package writes it, else one line naming the tool that can."""
    kind = kind.lower()
    if kind in TYPES:
        return kind
    if kind in K_QUANTS:
        raise GGUFExportError(
            f"--gguf {kind}: medqa writes f16 and q8_0 (the gguf package's writer); for {kind}, write f16 and "
            f"quantize it with llama.cpp: llama-quantize model-f16.gguf model-{kind}.gguf {kind.upper()}")
    raise GGUFExportError(f"--gguf {kind}: expected f16 or q8_0")


def permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """A query or key projection's rows in llama.cpp's order (its rotary embedding pairs
    neighbouring dimensions where transformers pairs the two halves); transformers' GGUF
    reader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: Any) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` tensor for a base with Llama 3.1's rope scaling (its
    `convert_hf_to_gguf.py`); None for a base without it."""
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if str(scaling.get("rope_type", scaling.get("type", ""))).lower() != "llama3":
        return None
    base = scaling.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _pre_tokenizer(tokenizer_json: dict[str, Any], source: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: the source GGUF's where the base was
    one, else recognised from tokenizer.json ("default" where not recognised)."""
    if isinstance(source.get("tokenizer.ggml.pre"), str):
        return source["tokenizer.ggml.pre"]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"] and "\\p{N}{1,3}" in json.dumps(steps[0].get("pattern", {})):
        return "llama-bpe"  # Llama 3's pattern
    return "default"


def tokenizer_fields(tokenizer: Any, vocab_size: int, source: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer as llama.cpp reads it (`gpt2`: byte-level BPE tokens, their types and the
    merges), from the tokenizer's own `tokenizer.json`. Rows of the embedding beyond the
    tokenizer's tokens are written as unused tokens, as llama.cpp's converter writes them."""
    from gguf import TokenType

    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if not state or (state.get("model") or {}).get("type") != "BPE":
        raise GGUFExportError("--gguf writes byte-level BPE tokenizers (Llama 3's, SmolLM2's, GPT-2's); this base's "
                              "is another kind: write --merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    tokens: dict[int, str] = {i: t for t, i in state["model"]["vocab"].items()}
    kinds = dict.fromkeys(tokens, int(TokenType.NORMAL))
    for added in state.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        kinds[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    count = max(vocab_size, max(tokens) + 1)
    listed = [tokens.get(i, f"[PAD{i}]") for i in range(count)]
    types = [kinds.get(i, int(TokenType.UNUSED)) for i in range(count)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    fields = {"model": "gpt2", "pre": _pre_tokenizer(state, source), "tokens": listed, "types": types, "merges": merges,
              "add_bos": adds_bos(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None)}
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        fields[f"{role}_id"] = token_id if isinstance(token_id, int) and 0 <= token_id < count else None
    return fields


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token before a text by itself (Llama 3's does,
    SmolLM2's does not): llama.cpp then adds it too."""
    probe = tokenizer("a").input_ids
    return bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id


def source_fields(pretrained: str) -> dict[str, Any]:
    """The tokenizer settings of the base's own GGUF file, where it was one (read as values,
    never run): llama.cpp's pre-tokenizer name is kept from it."""
    from medqa.bases import SMOLLM2, smollm2_file

    path = smollm2_file() if pretrained == SMOLLM2 else Path(pretrained).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        return {}
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return {} if field is None else {"tokenizer.ggml.pre": field.contents()}


def _plan(state: dict[str, Any], config: Any, qtype: str) -> list[tuple[str, str, Any, int]]:
    """(GGUF name, transformers name, GGML type, heads to permute by) of every tensor to write."""
    from gguf import MODEL_ARCH, GGMLQuantizationType, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output projection from the embedding when it is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"--gguf: the merged model has a tensor {key} that llama.cpp's Llama layout has no "
                                  "name for; write --merged and convert it with llama.cpp's convert_hf_to_gguf.py")
        heads = (config.num_attention_heads if key.endswith("q_proj.weight")
                 else config.num_key_value_heads if key.endswith("k_proj.weight") else 0)
        if tensor.ndim == 1:
            kind = GGMLQuantizationType.F32
        elif qtype == "q8_0" and tensor.shape[-1] % 32 == 0:
            kind = GGMLQuantizationType.Q8_0
        else:
            kind = GGMLQuantizationType.F16  # a row Q8_0's blocks of 32 do not divide stays 16-bit, as llama.cpp does
        plan.append((name, key, kind, heads))
    return plan


def _data(tensor: Any, kind: Any, heads: int) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    data = tensor.detach().float().cpu().numpy()
    if heads:
        data = permuted(data, heads)
    if kind == GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if kind == GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return quants.quantize(data, kind)


def write_gguf(model: Any, tokenizer: Any, out: Path, qtype: str, prompt: dict[str, Any], name: str,
               source: dict[str, Any]) -> Path:
    """Write the merged transformers Llama `model` and `tokenizer` to the GGUF file `out`.
    `prompt` is medqa_prompt.json's content, stored as `medqa.*` metadata."""
    import gguf

    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise GGUFExportError(f"--gguf writes the Llama architecture; this base is {config.model_type!r}: write --merged "
                              "and convert it with llama.cpp's convert_hf_to_gguf.py")
    qtype = check_type(qtype)
    state = model.state_dict()
    plan = _plan(state, config, qtype)
    words = tokenizer_fields(tokenizer, state["model.embed_tokens.weight"].shape[0], source)
    rope_factors = llama3_rope_factors(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    parameters = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(words["tokens"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(words["model"])
    writer.add_tokenizer_pre(words["pre"])
    writer.add_token_list(words["tokens"])
    writer.add_token_types(words["types"])
    writer.add_token_merges(words["merges"])
    writer.add_add_bos_token(words["add_bos"])
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if words[f"{role}_id"] is not None:
            add(words[f"{role}_id"])
    if words["chat_template"]:
        writer.add_chat_template(words["chat_template"])
    writer.add_string("medqa.prompt", json.dumps(prompt))
    writer.add_array("medqa.labels", list(prompt["labels"]))
    writer.add_string("medqa.system_prompt", prompt["system_prompt"])
    writer.add_string("medqa.instruction", prompt["instruction"])

    if rope_factors is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_factors.shape, np.dtype(np.float32), rope_factors.nbytes)
    for gguf_name, key, kind, _ in plan:
        shape = tuple(state[key].shape)
        stored = gguf.quants.quant_shape_to_byte_shape(shape, kind) if kind == gguf.GGMLQuantizationType.Q8_0 else shape
        itemsize = 4 if kind == gguf.GGMLQuantizationType.F32 else 2 if kind == gguf.GGMLQuantizationType.F16 else 1
        dtype = np.dtype(np.uint8 if itemsize == 1 else np.float16 if itemsize == 2 else np.float32)
        writer.add_tensor_info(gguf_name, stored, dtype, int(np.prod(stored)) * itemsize, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    for _, key, kind, heads in plan:
        writer.write_tensor_data(_data(state[key], kind, heads))
    writer.close()
    return out


def modelfile(gguf_name: str, tokenizer: Any, prompt: dict[str, Any]) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` beside it: its chat template rendered
    with Ollama's placeholders, medqa's system prompt, and greedy decoding of a few tokens, so
    the first word of the answer is the label. Not tested by medqa (nothing here runs Ollama)."""
    marker_system, marker_user = "\x00SYSTEM\x00", "\x00PROMPT\x00"
    messages = [{"role": "system", "content": marker_system}, {"role": "user", "content": marker_user}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if marker_system not in rendered or marker_user not in rendered:
        raise GGUFExportError("--gguf: the base's chat template drops the system or user message; the Modelfile's "
                              "TEMPLATE cannot be made from it")
    template = rendered.replace(marker_system, "{{ .System }}").replace(marker_user, "{{ .Prompt }}")
    bos = tokenizer.bos_token
    if bos and adds_bos(tokenizer) and template.startswith(bos):
        template = template[len(bos):]  # llama.cpp adds the file's BOS token itself, as the tokenizer did
    system = prompt["system_prompt"]
    stops = [t for t in {tokenizer.eos_token, getattr(tokenizer, "pad_token", None)} if t]
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(template)}", f"SYSTEM {_quoted(system)}",
             "PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER seed 0", "PARAMETER num_predict 4",
             *(f"PARAMETER stop {json.dumps(t)}" for t in sorted(stops))]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """A Modelfile value: Ollama's triple quotes, which the text cannot close early."""
    if '"""' in text:
        raise GGUFExportError('--gguf: a chat template or system prompt holding """ cannot be written into a Modelfile')
    return f'"""{text}"""'
