"""Where a base model comes from: GGUF files dequantized once into a cached folder, and the
errors for files that cannot be read."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medqa.bases import SMOLLM2, BaseModelError, gguf_folder, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_gguf_base_gives_transformers_own_gguf_logits(smollm2):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    folder = Path(resolve(SMOLLM2))
    assert resolve(smollm2) == str(folder)  # the short name and the file's path are one folder
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    path = Path(smollm2)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2, 198]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)
    assert not hasattr(ours.config, "quantization_config")  # an ordinary folder: saves, merges, exports


@pytest.mark.slow
def test_the_folder_is_built_once_and_a_damaged_one_rebuilt(medqa_cache, tmp_path):
    from pathlib import Path

    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")  # converted in seconds; SmolLM2's file takes half a minute
    folder = Path(resolve(str(path)))
    weights = folder / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert Path(resolve(str(path))) == folder and weights.stat().st_mtime_ns == built  # loaded, not rebuilt
    record = json.loads((folder / "medqa-gguf.json").read_text())
    assert len(record["sha256"]) == 64 and record["sha256"][:16] in folder.name

    (folder / "medqa-gguf.json").unlink()  # as a conversion killed before its record was written leaves it
    assert Path(resolve(str(path))) == folder and weights.stat().st_mtime_ns != built
    assert (folder / "medqa-gguf.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medqa.tiny import tiny_llama

    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()  # Q8_0 read back:
    tiny = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32)          # near the tiny Llama's
    for name, tensor in tiny.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, atol=tensor.abs().max().item() / 100, rtol=0)
    text = "Does the drug lower blood pressure?"
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == AutoTokenizer.from_pretrained(tiny_llama())(text).input_ids


def test_smollm2_tokenizer_takes_the_files_own_special_tokens(smollm2):
    # transformers' GGUF conversion says <|im_start|> ends a sequence; the file says <|im_end|>.
    from medqa.backends import load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert tok.eos_token_id == 2


def test_files_that_are_not_readable_gguf_get_one_line_naming_them(tmp_path):
    import gguf

    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(BaseModelError, match=r"notes\.gguf is not a readable GGUF file"):
        gguf_folder(text)

    other = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(other), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BaseModelError, match=r"encoder\.gguf: architecture 'bert' cannot be read.*it reads .*llama"):
        gguf_folder(other)

    with pytest.raises(BaseModelError, match="no such GGUF file"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(BaseModelError, match="the built-in models are builtin:tiny-llama, builtin:smollm2"):
        resolve("builtin:gpt-5")


@pytest.mark.slow
@pytest.mark.parametrize("change,said", [
    ({"leave_out": ("blk.1.attn_q.weight",)}, "1 tensor(s) the llama architecture needs are missing (e.g. "
                                               "model.layers.1.self_attn.q_proj.weight)"),
    ({"cut": ("blk.0.ffn_down.weight",)}, "model.layers.0.mlp.down_proj.weight (")])
def test_a_gguf_file_that_is_not_a_whole_model_is_refused_and_nothing_cached(medqa_cache, tmp_path, change, said):
    import inprocess
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "broken.gguf", **change)
    before = set(medqa_cache.iterdir())
    done = inprocess.run(["test", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.pretrained", str(path),
                          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medqa test: error: {path}: not a whole model: ") and said in last, last
    assert not [p for p in set(medqa_cache.iterdir()) - before if p.name.startswith("gguf-broken") and p.is_dir()]


@pytest.mark.slow
def test_a_converted_folder_is_trusted_by_its_files_digests_not_its_record_alone(medqa_cache, tmp_path):
    """Other weights put in place of the conversion's, or a pickled pytorch_model.bin beside
    them: the folder is converted again from the file before anything is scored (issue 42, class 2)."""
    import inprocess
    from safetensors.torch import load_file, save_file
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "digested.gguf")
    folder = Path(resolve(str(path)))
    weights = folder / "model.safetensors"
    original = {k: v.clone() for k, v in load_file(weights).items()}
    save_file({k: torch.zeros_like(v) for k, v in original.items()}, str(weights))  # same names and size
    done = inprocess.run(["test", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.pretrained", str(path),
                          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.limit_test_batches", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(torch.equal(v, original[k]) for k, v in load_file(weights).items())  # the file's weights again

    (folder / "pytorch_model.bin").write_bytes(b"a pickle")
    assert Path(resolve(str(path))) == folder and not (folder / "pytorch_model.bin").exists()
