"""The LoRA adapter's shape (rank, alpha, dropout, target modules, rsLoRA, the layers it is
on), built once for every backend, the saved adapter and the checks that a checkpoint fits a
run. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""LoRA's default targets: every attention and MLP projection of a Llama layer."""


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter's shape, built once here for every backend, the saved adapter and the
    checks that a checkpoint fits a run."""

    r: int
    alpha: int
    dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False
    layers: int | None = None
    """LoRA on the top `layers` decoder layers only (those nearest the output); None: every layer."""

    def __post_init__(self) -> None:
        if not self.target_modules:
            object.__setattr__(self, "target_modules", list(LLAMA_LORA_TARGETS))

    @classmethod
    def from_hparams(cls, hp: Any) -> LoraSettings:
        """From a run's `lora_*` settings (a checkpoint's hyper-parameters, hparams.yaml, the
        CLI's model namespace); what is not there takes the defaults."""
        return cls(hp.get("lora_r"), hp.get("lora_alpha"), hp.get("lora_dropout") or 0.0,
                   hp.get("target_modules"), bool(hp.get("use_rslora", False)), hp.get("lora_layers"))

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """The decoder layers that get adapters, for a model of `num_layers`; None: all."""
        if self.layers is None or self.layers >= num_layers:
            return None
        return list(range(num_layers - self.layers, num_layers))

    def peft_config(self, base_model: str | None = None, layers: list[int] | None = None) -> Any:
        """PEFT's config; `layers`: the decoder layers with adapters (`layer_indices`), None: all."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
                          use_rslora=self.use_rslora, bias="none", task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model, layers_to_transform=layers)

    def differences(self, saved: Any) -> list[str]:
        """How the LoRA settings a run saved (its hyper-parameters) differ from these; settings
        it did not save count as equal, and target modules compare as sets."""
        ours = {"lora_r": self.r, "lora_alpha": self.alpha, "target_modules": self.target_modules,
                "use_rslora": self.use_rslora, "lora_layers": self.layers}
        # Runs from before `lora_layers` put LoRA on every layer.
        theirs = {**ours, "lora_layers": None, **{k: saved[k] for k in ours if k in saved}}
        theirs["target_modules"] = theirs["target_modules"] or LLAMA_LORA_TARGETS
        same = {"target_modules": lambda a, b: (isinstance(a, list) and all(isinstance(m, str) for m in a)
                                                and set(a) == set(b))}  # an order means nothing; untrusted: names only
        return [f"{k}: checkpoint {theirs[k]!r}, this run {v!r}" for k, v in ours.items()
                if not same.get(k, lambda a, b: a == b)(theirs[k], v)]
