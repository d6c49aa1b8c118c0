"""A GGUF file of the built-in tiny Llama, written as llama.cpp writes one (its weight matrices
in Q8_0, the norms in float32, its byte-level BPE tokenizer as `gpt2` tokens and merges):
converting it takes seconds where SmolLM2-135M's file takes half a minute."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from safetensors.torch import load_file

from medqa.gguf_out import permuted  # llama.cpp's row order, as export writes it
from medqa.tiny import tiny_llama

LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path: Path, leave_out: tuple[str, ...] = (), cut: tuple[str, ...] = ()) -> Path:
    """The tiny Llama as a GGUF file; `leave_out` names GGUF tensors not to write (a file missing
    a layer), `cut` tensors written one row short (a shape the metadata does not imply)."""
    folder = tiny_llama()
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokens = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    kinds = dict.fromkeys(tokens, 1)  # normal
    for added in tokenizer["added_tokens"]:
        tokens[added["id"]], kinds[added["id"]] = added["content"], 3  # control
    assert sorted(tokens) == list(range(len(tokens)))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([tokens[i] for i in range(len(tokens))])
    writer.add_token_types([kinds[i] for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(config["num_hidden_layers"]):
        names.update({f"model.layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight"
                      for ours, theirs in LAYER_TENSORS.items()})
    for name, tensor in load_file(folder / "model.safetensors").items():
        if names[name] in leave_out:
            continue
        data = tensor.float().numpy()
        if names[name] in cut:
            data = data[:-32] if data.ndim == 2 else data[:-1]
        if name.endswith("q_proj.weight"):
            data = permuted(data, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            data = permuted(data, config["num_key_value_heads"])
        if data.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(names[name], gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(names[name], data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
