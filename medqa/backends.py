"""The only place that imports unsloth, bitsandbytes and transformers model classes:
load the model and tokenizer, attach LoRA.

Backends:
- `unsloth`: `FastLanguageModel` in 4-bit (or 16-bit) with Unsloth's LoRA and its own
  gradient checkpointing. Needs CUDA. Unsloth is imported before transformers and peft,
  since it patches them.
- `hf`: transformers + peft, with bitsandbytes NF4 4-bit when `load_in_4bit` and
  `prepare_model_for_kbit_training`: the standard QLoRA recipe. Runs on the CPU too, 4-bit
  included from bitsandbytes 0.48 on.
- `auto`: `unsloth` when CUDA is there and unsloth is installed, else `hf`.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch

from medqa.lora import LoraSettings

Backend = Literal["auto", "unsloth", "hf"]


class BackendError(RuntimeError):
    """A model that cannot be loaded as asked, with what to do instead."""


def resolve_pretrained(pretrained: str) -> str:
    """A hub id or local directory for transformers and Unsloth (`medqa.bases`: built-in
    names and GGUF files become cached folders)."""
    from medqa.bases import resolve

    return resolve(pretrained)


def _hub_error(pretrained: str, e: Exception) -> BackendError:
    local = Path(pretrained).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        return BackendError(f"{pretrained} is not a model folder: it has no config.json or tokenizer files (expected "
                            "a folder that save_pretrained or a hub download wrote)")
    if not local.exists() and pretrained.startswith((".", "/", "~")):
        return BackendError(f"--model.pretrained {pretrained}: no such folder")
    if local.exists() or pretrained.startswith((".", "/", "~")):
        return BackendError(f"could not load the model from {pretrained}: {type(e).__name__}: {e}")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return BackendError(
            f"{pretrained!r} is not in the local Hugging Face cache, and the hub is off (offline, or HF_HUB_OFFLINE=1). "
            f"Download it where there is network (huggingface-cli download {pretrained}) and pass its folder as "
            "--model.pretrained; to try medqa on this machine: python -m medqa fit --config configs/demo.yaml")
    return BackendError(f"could not load {pretrained!r} from the Hugging Face hub: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def load_tokenizer(pretrained: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `pretrained` (hub id, local directory or built-in name)."""
    from transformers import AutoTokenizer

    path = resolve_pretrained(pretrained)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(pretrained, e) from None


def unsloth_available() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def resolve_backend(backend: Backend) -> Literal["unsloth", "hf"]:
    """Pick the concrete backend; refuse `unsloth` without CUDA with a clear message."""
    if backend == "auto":
        return "unsloth" if torch.cuda.is_available() and unsloth_available() else "hf"
    if backend == "unsloth":
        if not torch.cuda.is_available():
            raise BackendError(
                "--model.backend unsloth needs a CUDA GPU and none is visible here; "
                "use --model.backend hf (or auto) to run on this machine"
            )
        if not unsloth_available():
            raise BackendError("--model.backend unsloth: unsloth is not installed; pip install 'medqa[gpu]'")
    return backend


def _device_map() -> dict[str, Any] | None:
    # One process per GPU (DDP included): the base goes onto this process's own device.
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else None


def _dtype(name: str) -> torch.dtype:
    from medqa.dtypes import DtypeError, compute_dtype

    try:
        return compute_dtype(name)
    except DtypeError as e:
        raise BackendError(str(e)) from None


def load_unsloth(
    pretrained: str, max_length: int, load_in_4bit: bool, dtype: str, lora: LoraSettings,
    gradient_checkpointing: bool, seed: int, trust_remote_code: bool,
) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # first: it patches transformers and peft

    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=resolve_pretrained(pretrained),
            max_seq_length=max_length,
            dtype=_dtype(dtype),
            load_in_4bit=load_in_4bit,
            device_map=_device_map(),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise _hub_error(pretrained, e) from None
    model = _add_lora(model, lambda m: FastLanguageModel.get_peft_model(
        m,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=seed,
        use_rslora=lora.use_rslora,
        layers_to_transform=lora.layer_indices(m.config.num_hidden_layers),
        max_seq_length=max_length,
    ), lora, pretrained)
    # Loading leaves the model in eval mode, and Lightning keeps the modes it finds: without
    # this, training would run with gradient checkpointing off (3x the memory at the 8B shape).
    FastLanguageModel.for_training(model)
    return model, tokenizer


def _check_cpu_4bit() -> None:
    """bitsandbytes runs NF4 on the CPU from 0.48 on (slower than 16-bit there: for tests and
    for comparing 4-bit with 16-bit on one machine)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("bitsandbytes")
    except PackageNotFoundError:
        found = None
    if found is None or tuple(int(p) for p in found.split(".")[:2] if p.isdigit()) < (0, 48):
        raise BackendError(
            f"--model.load_in_4bit true without a GPU needs bitsandbytes 0.48 or newer (found: {found or 'none'}): "
            "pip install 'bitsandbytes>=0.48,<0.51', or pass --model.load_in_4bit false"
        )


def load_hf(
    pretrained: str, load_in_4bit: bool, dtype: str, lora: LoraSettings,
    gradient_checkpointing: bool, trust_remote_code: bool,
) -> tuple[Any, Any]:
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    path = resolve_pretrained(pretrained)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype)}
    if load_in_4bit:
        if not cuda:
            _check_cpu_4bit()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
    if cuda:
        kwargs["device_map"] = _device_map()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error(pretrained, e) from None
    if not load_in_4bit and getattr(model, "hf_quantizer", None) is not None:
        # A base saved quantized (e.g. unsloth/...-bnb-4bit) loads quantized whatever is asked.
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"{pretrained} is saved quantized: its weights are dequantized to {kwargs['dtype']}, "
                       "as --model.load_in_4bit false asks")
        model = model.dequantize(dtype=kwargs["dtype"])
    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = _add_lora(model, lambda m: get_peft_model(m, lora.peft_config(layers=lora.layer_indices(m.config.num_hidden_layers))),
                      lora, pretrained)
    model.train()  # from_pretrained returns eval mode, which Lightning would keep
    return model, load_tokenizer(pretrained, trust_remote_code)


def _add_lora(model: Any, add: Any, lora: LoraSettings, pretrained: str) -> Any:
    """`add(model)`, with peft's error for target modules the base lacks in one line naming
    the base's own linear layers."""
    try:
        return add(model)
    except ValueError as e:  # peft's NoMatchingPeftModuleError
        if "target module" not in str(e).lower():
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise BackendError(f"--model.target_modules {lora.target_modules}: {pretrained} has no such linear layers; "
                           f"its are named {', '.join(names)}") from None


def load(
    backend: Backend, pretrained: str, max_length: int, load_in_4bit: bool, dtype: str, lora: LoraSettings,
    gradient_checkpointing: bool, seed: int, trust_remote_code: bool,
) -> tuple[Any, str]:
    """The base model with a fresh LoRA adapter, on the backend `backend` resolves to, and
    that backend's name; every layer checkpointed when `gradient_checkpointing`."""
    resolved = resolve_backend(backend)
    common = dict(pretrained=pretrained, load_in_4bit=load_in_4bit, dtype=dtype, lora=lora,
                  gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code)
    if resolved == "unsloth":
        model, _ = load_unsloth(max_length=max_length, seed=seed, **common)
    else:
        torch.manual_seed(seed)  # the LoRA initialisation
        model, _ = load_hf(**common)
    return model, resolved


def saved_quantized(pretrained: str, trust_remote_code: bool) -> bool:
    """Whether the base's config says its weights are saved quantized (bitsandbytes NF4 or
    similar), read from its config.json alone."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_pretrained(pretrained), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(pretrained, e) from None
    return getattr(config, "quantization_config", None) is not None


def save_merged(model: Any, tokenizer: Any, out: Path, backend: str, dtype: str) -> None:
    """Write the base model with the LoRA weights merged in, and the tokenizer, to `out`:
    Unsloth's merged 16-bit save on that backend (for a base saved in 16-bit; it refuses
    one saved in 4-bit, which `export` sends here as "hf"), else peft's `merge_and_unload`
    on a base loaded in 16/32-bit."""
    if backend == "unsloth":
        model.save_pretrained_merged(str(out), tokenizer, save_method="merged_16bit")
        return
    merged = model.merge_and_unload().to(_dtype(dtype))
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, pad_id: int, unsloth: bool) -> torch.Tensor:
    """Greedy generation from a PEFT model. Unsloth's training forward cannot generate: its
    inference mode is switched on for the call and back off after."""
    if unsloth:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    try:
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    finally:
        if unsloth:
            FastLanguageModel.for_training(model)
            model.eval()  # predict runs in eval mode; for_training switched the modules to training


@torch.no_grad()
def continuations(model: Any, prompts: list[list[int]], max_new_tokens: int, pad_id: int, unsloth: bool) -> list[list[int]]:
    """Each prompt's greedy continuation, one prompt at a time (prompts differ in length, and
    this is for reading, not for speed)."""
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        texts.append(generate(model, ids, max_new_tokens, pad_id, unsloth)[0, ids.size(1) :].tolist())
    return texts


def keep_activations(model: Any, kept: list[int]) -> None:
    """Recompute every decoder layer's activations in backward except those of the layers in
    `kept`. Both backends checkpoint through transformers' `GradientCheckpointingLayer`, which
    reads each layer's own `gradient_checkpointing` flag (Unsloth's offloaded variant is its
    checkpoint function), so the flags choose the layers. The model must have been loaded
    with gradient checkpointing on."""
    decoder, _ = decoder_and_head(model)
    for i, layer in enumerate(decoder.layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise BackendError(
                f"decoder layer {i} ({type(layer).__name__}) has no gradient_checkpointing flag, so "
                "--model.gradient_checkpointing auto cannot choose layers; pass true or false"
            )
        layer.gradient_checkpointing = i not in kept


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack (returns hidden states) and the output projection of a PEFT model,
    so logits are computed only at the positions that are used."""
    causal_lm = model.get_base_model()
    return causal_lm.model, causal_lm.get_output_embeddings()


def _requested_backend(argv: list[str]) -> str:
    """`model.backend` as the command line sets it (config files, then flags; last wins)."""
    backend = "auto"
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
        if arg.split("=", 1)[0] in ("--config", "-c") and Path(value).is_file():
            import yaml

            config = yaml.safe_load(Path(value).read_text()) or {}
            backend = ((config.get("model") or {}).get("backend")) or backend
        elif arg.split("=", 1)[0] == "--model.backend":
            backend = value
    return backend


def import_unsloth_first(argv: list[str]) -> None:
    """Import unsloth before anything imports transformers or peft (Lightning does, through
    torchmetrics), when this command will use the unsloth backend. `--help` and the `hf`
    backend never import it."""
    commands = ("fit", "validate", "test", "predict", "cv", "export", "ask")
    if not argv or argv[0] not in commands or "--help" in argv or "-h" in argv:
        return
    # Without CUDA or unsloth there is nothing to patch; resolve_backend explains later.
    if _requested_backend(argv[1:]) in ("unsloth", "auto") and torch.cuda.is_available() and unsloth_available():
        _use_launched_device()
        global _unsloth_import_seconds
        began = time.perf_counter()
        import unsloth  # noqa: F401

        _unsloth_import_seconds = time.perf_counter() - began


_unsloth_import_seconds: float | None = None


def unsloth_import_seconds() -> float | None:
    """How long `import_unsloth_first` took to import Unsloth in this process; None if it did not."""
    return _unsloth_import_seconds


def _use_launched_device() -> None:
    """In a process that a launcher started for one GPU (Lightning's DDP launcher, torchrun,
    SLURM through Lightning all set LOCAL_RANK), make that GPU current before Unsloth's import
    touches CUDA; otherwise every process would first open a context on GPU 0. Lightning sets
    the device again later, from its own device list."""
    local_rank = os.environ.get("LOCAL_RANK", "")
    if local_rank.isdigit() and int(local_rank) < torch.cuda.device_count():
        torch.cuda.set_device(int(local_rank))
