"""The `LightningModule`: a 4-bit Llama with LoRA, answer-only loss, categorical scoring
over the task's label words, and checkpoints that hold only what was trained."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from medqa.backends import Backend, decoder_and_head, load
from medqa.lora import LoraSettings
from medqa.checkpoints import CheckpointError, base_fingerprint, misfits, starting_weights
from medqa.dequantize import keep_dequantized
from medqa.fp8 import choose as choose_fp8, use_fp8
from medqa.memory_cpu import ReturnFreedMemory
from medqa.memory import MicroBatch, Plan, limit_memory
from medqa.plans import PlannedMemory
from medqa.frozen import FrozenLayers, frozen_layers
from medqa.metrics import StageScores, answer_loss, write_hparams
from medqa.schedules import WarmupCosine
from medqa.scoring import Scoring

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting with a value that cannot work (a zero or negative size, say)."""


class CheckpointMismatch(RuntimeError):
    """A checkpoint whose adapter does not fit the model built for this run."""


class MedQALoRA(Scoring, PlannedMemory, L.LightningModule):
    """LoRA fine-tuning of a (4-bit) Llama for yes/no/maybe answers.

    Args:
        pretrained: Hub id or local directory of the base model, or `builtin:tiny-llama`.
        backend: `unsloth`, `hf` (transformers + peft + bitsandbytes) or `auto`.
        load_in_4bit: Load the base in 4-bit NF4 (QLoRA); false for 16-bit LoRA.
        keep_dequantized: Dequantize a 4-bit base once and keep it in `dtype`: the same values,
            no dequantization in each step, 2 bytes a weight. `auto`: in `fit`, where the card
            still keeps every layer's activations with it (`medqa.dequantize`).
        load_in_fp8: Compute the frozen base's linear layers in FP8 (e4m3, row-wise scales,
            quantized once after loading), on cards with FP8 tensor cores (compute capability
            8.9+); refused elsewhere. `auto`: on where FP8 training was measured faster on that
            card (`medqa.fp8`), off elsewhere. The LoRA weights stay in `dtype`.
        dtype: The base's dtype, on a GPU or the CPU: `auto` (bfloat16 on a GPU, and on a CPU
            whose bf16 units a probe confirms; float32 on other CPUs), bfloat16 (float16 on cards
            without bf16), float32.
        max_length: Longest sequence; linked to `data.max_length`, not set here.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
        lora_dropout: Dropout on the LoRA input (Unsloth is fastest with 0).
        target_modules: Linear layers that get LoRA adapters.
        use_rslora: Rank-stabilised LoRA scaling.
        lora_layers: LoRA on the top N decoder layers only (those nearest the output); None:
            every layer. The layers below then need no backward pass and keep no activations.
        cache_frozen: Compute the frozen layers below the lowest LoRA layer once per question
            and keep what they give (on disk, under the medqa cache), so each step, epoch and
            later command on the same base runs only the top layers (`medqa.frozen`). `auto`:
            where `lora_layers` leaves layers below, on the hf backend.
        gradient_checkpointing: Recompute activations in backward (Unsloth's own variant on
            that backend) to fit long sequences. `auto`: in `fit`, keep as many layers'
            activations as the card's free memory allows for the longest training batch,
            recompute the rest, and step down on an out-of-memory error (`medqa.memory`).
        grow_micro_batch: With `auto`, train on the largest micro-batch that keeps every
            layer's activations, accumulating fewer, so each optimizer step has the configured
            `data.batch_size` x `trainer.accumulate_grad_batches` questions (8 x 2 can become 16 x 1).
        memory_limit_gib: Hold this process to this much GPU memory (a shared card, or a
            smaller card's plan tried on a larger one): `auto` plans within it and the
            allocator refuses more. Without a GPU, `auto` plans within this much of the
            machine's memory (nothing else holds the process to it). None: all there is.
        trust_remote_code: Let the hub model run its own Python code. Off unless you trust it.
        nonfinite: On a NaN or infinite training loss (in any process): `error` stops the run
            naming the step and the questions in the batch; `skip` leaves the batch out of its
            step (a step of no other batch changes nothing) and counts it (`train/skipped_batches`).
        lora_seed: Seed for the LoRA initialisation.
        label_smoothing: In training, move this share of the decision word's target to the
            other labels' words, equally (label smoothing among the labels, `medqa.metrics.
            answer_loss`); 0 (the default): the gold word alone. Validation losses are unsmoothed.
        init_adapter: Start `fit` from this trained adapter (a medqa checkpoint or a PEFT
            folder) instead of a fresh one: a new run, with a fresh optimizer and schedule
            (the PubMedQA paper's PQA-A, then PQA-L). Its base and LoRA shape must be this run's.
        label_bias: Added to the label words' log-probabilities before each decision in
            validation, test, predict and ask (a class-prior correction: one number a label, in
            the task's label order). `python -m medqa priors` fits it on held-out predictions
            and writes it as a config (`cv` does, into CV_DIR/label_bias.yaml). None: no change.
        ensemble: Score with the best adapters of `cv`'s ten folds (this `--cv_dir`) together,
            their label probabilities averaged (`medqa.ensemble`): validate, test, predict and
            ask, without --ckpt_path. Costs ten forward passes a batch.
        rationale_tokens: `predict` only: after the scored decision, generate up to this many
            tokens of explanation (greedy), written to predictions.jsonl. 0 (the default)
            generates nothing. Set by `predict --generate_rationale true`.
        answer_tokens: The task's label words and their token ids, the pad id and the tokens
            that ask for a rationale (`QADataModule.answer_tokens`); linked from the data by
            the CLI, not set here. Saved with every checkpoint.
        optimizer: Optimizer for the LoRA weights (e.g. torch.optim.AdamW,
            bitsandbytes.optim.AdamW8bit on a GPU).
        scheduler: Learning-rate schedule, stepped every optimizer step.
    """

    def __init__(
        self,
        pretrained: str = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
        backend: Backend = "auto",
        load_in_4bit: bool = True,
        keep_dequantized: bool | Literal["auto"] = "auto",
        load_in_fp8: bool | Literal["auto"] = "auto",
        dtype: str = "auto",
        max_length: int = 1024,
        lora_r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        use_rslora: bool = False,
        lora_layers: int | None = None,
        cache_frozen: bool | Literal["auto"] = "auto",
        gradient_checkpointing: bool | Literal["auto"] = "auto",
        memory_limit_gib: float | None = None,
        grow_micro_batch: bool = True,
        trust_remote_code: bool = False,
        nonfinite: Literal["error", "skip"] = "error",
        lora_seed: int = 3407,
        label_smoothing: float = 0.0,
        init_adapter: str | None = None,
        label_bias: list[float] | None = None,
        ensemble: str | None = None,
        rationale_tokens: int = 0,
        answer_tokens: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable = WarmupCosine,
    ) -> None:
        super().__init__()
        for name, value, ok, expected in (
            ("lora_r", lora_r, lora_r >= 1, "1 or more"), ("lora_alpha", lora_alpha, lora_alpha > 0, "above 0"),
            ("lora_dropout", lora_dropout, 0 <= lora_dropout < 1, "in [0, 1)"),
            ("lora_layers", lora_layers, lora_layers is None or lora_layers >= 1, "1 or more (or null: every layer)"),
            ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
            ("rationale_tokens", rationale_tokens, rationale_tokens >= 0, "0 or more"),
            ("memory_limit_gib", memory_limit_gib, memory_limit_gib is None or memory_limit_gib > 0, "above 0"),
            *((name, value, value in (True, False, "auto"), "true, false or auto") for name, value in
              (("gradient_checkpointing", gradient_checkpointing), ("keep_dequantized", keep_dequantized),
               ("cache_frozen", cache_frozen), ("load_in_fp8", load_in_fp8))),
        ):
            if not ok:
                raise SettingsError(f"--model.{name} must be {expected}, got {value}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.pretrained, self.backend, self.load_in_4bit, self.dtype_name = pretrained, backend, load_in_4bit, dtype
        self.max_length, self.keep_dequantized, self.cache_frozen = max_length, keep_dequantized, cache_frozen
        self.load_in_fp8 = load_in_fp8
        self.lora = LoraSettings(lora_r, lora_alpha, lora_dropout, target_modules, use_rslora, lora_layers)
        self.gradient_checkpointing, self.trust_remote_code, self.lora_seed = gradient_checkpointing, trust_remote_code, lora_seed
        self.memory_limit_gib, self._limit_bytes, self.grow_micro_batch = memory_limit_gib, None, grow_micro_batch
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.nonfinite, self.skipped_batches = nonfinite, 0
        self._window = [0, 0]  # this optimizer step's batches: kept, skipped for a non-finite loss
        self._planned_steps: int | None = None  # this run's schedule length, set with the optimizer
        self.rationale_tokens, self.init_adapter = rationale_tokens, init_adapter
        self.label_smoothing = label_smoothing
        # Adapter-only checkpoints: the frozen base is not in them, so loading is not strict.
        self.strict_loading = False
        self.model: torch.nn.Module | None = None
        self.resolved_backend: str | None = None
        self.frozen: FrozenLayers | None = None  # the frozen layers below LoRA, when computed once
        if answer_tokens is None:
            raise SettingsError("MedQALoRA needs answer_tokens: the CLI links them from the data; in code pass "
                                "answer_tokens=datamodule.answer_tokens")
        self.labels: list[str] = list(answer_tokens["labels"])
        self.label_ids: list[list[int]] = [list(ids) for ids in answer_tokens["label_ids"]]
        self.pad_id: int = answer_tokens["pad_id"]
        # On the model's device once: a copy for each batch would wait for the GPU.
        self.register_buffer("label_first_ids", torch.tensor([ids[0] for ids in self.label_ids]), persistent=False)
        if label_bias is not None and (len(label_bias) != len(self.labels) or not all(map(math.isfinite, label_bias))):
            raise SettingsError(f"--model.label_bias needs one finite number for each of {', '.join(self.labels)}, "
                                f"got {label_bias}")
        self.register_buffer("label_bias", None if label_bias is None else torch.tensor(label_bias), persistent=False)
        self.ensemble_dir, self.ensemble = ensemble, None  # the folds' adapters, loaded to score (`start_ensemble`)
        self.rationale_suffix: list[list[int]] = [list(ids) for ids in answer_tokens["rationale_suffix"]]  # a label
        n = len(self.labels)
        self.val_scores, self.test_scores = StageScores("val", n), StageScores("test", n)
        self.plan: Plan | None = None  # the `auto` plan in use, once fit has chosen one
        self._trainable: list[Tensor] | None = None

    # ------------------------------------------------------------------ building

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self._limit_bytes = limit_memory(self.memory_limit_gib)  # before loading: the weights count too
        # Where the base will be (backends.load puts it on this process's GPU where there is one),
        # so a refusal comes before the load.
        fp8, why = choose_fp8(self.load_in_fp8, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        model, backend = load(self.backend, self.pretrained, self.max_length, self.load_in_4bit, self.dtype_name,
                              self.lora, self.gradient_checkpointing is not False, self.lora_seed, self.trust_remote_code)
        self.model, self.resolved_backend = model, backend
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        rank_zero_info(f"Loaded {self.pretrained} with the {backend} backend ({'4-bit' if self.load_in_4bit else '16/32-bit'}); "
                       f"LoRA r={self.lora.r}: {trainable:,} trainable of {total:,} parameters.")
        if self.keep_dequantized is True:
            keep_dequantized(model, "--model.keep_dequantized true")
        decoder, _ = decoder_and_head(model)
        if fp8:
            use_fp8(decoder, decoder.embed_tokens.weight.dtype, why)
        elif why:
            rank_zero_info(why)
        self.frozen = frozen_layers(model, self.lora, self.cache_frozen, backend)

    def configure_callbacks(self) -> list[L.Callback]:
        callbacks = [MicroBatch()] if self.gradient_checkpointing == "auto" and self.grow_micro_batch else []
        return [*callbacks, ReturnFreedMemory()]  # active where the trainer runs on the CPU

    # ------------------------------------------------------------------ steps

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, rows: Tensor | None = None) -> Tensor:
        """Last hidden states of a right-padded batch; `rows` (positions of the flattened batch
        x time) says where they will be read, which the frozen-layers path uses to compute the
        last layer there alone (elsewhere every position is computed anyway).

        The mask is not passed on: pads come after every real token, so under causal
        attention no real token sees one, and the values read (answer and label positions)
        are the same. Without a mask, attention takes the fused causal kernels in training
        and in evaluation alike; with one, Unsloth builds a 4D mask in eval mode and falls
        back to a slower kernel.
        """
        if self.frozen is not None:
            return self.frozen.hidden_states(input_ids, attention_mask, rows)
        decoder, _ = decoder_and_head(self.model)
        out = decoder(input_ids=input_ids, attention_mask=None, use_cache=False)
        return out[0]

    def _loss(self, batch: dict[str, Any], train: bool = False) -> tuple[Tensor, Tensor]:
        """(answer loss, last hidden states) of a batch; the hidden states are read only at the
        answer tokens and where each label word is scored (`answer_pos` - 1). `train`: with
        `label_smoothing`."""
        _, head = decoder_and_head(self.model)
        ids = batch["input_ids"]
        scored = torch.arange(ids.size(0), device=ids.device) * ids.size(1) + batch["answer_pos"].to(ids.device) - 1
        rows = torch.cat([batch["loss_pos"].to(ids.device), scored])
        hidden = self.hidden_states(ids, batch["attention_mask"], rows)
        smoothing = self.label_smoothing if train else 0.0
        return answer_loss(hidden, head, batch["loss_pos"], batch["loss_targets"], batch.get("weight"), smoothing,
                           self.label_first_ids, scored), hidden

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        self._batch = batch  # for a retry after an out-of-memory error in backward
        while True:
            try:
                loss, _ = self._loss(batch, train=True)
                break
            except torch.OutOfMemoryError as e:
                error = str(e)  # handled outside the except: its traceback holds the activations
            self._out_of_memory(error)
        finite = bool(torch.isfinite(loss))  # one host sync a step; the progress bar makes one anyway
        # Under DDP every process must take the same path (one that skipped its backward would
        # leave the others waiting in the gradient all-reduce): they agree first.
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
            culprit = (f"questions in the batch: {', '.join(batch['ids'])}" if not finite
                       else f"in another process's batch (process {self.global_rank}'s loss was finite)")
            if self.nonfinite == "error":
                raise FloatingPointError(
                    f"non-finite training loss ({loss.item()}) at {where}; {culprit}. Check those records or "
                    "lower the learning rate; --model.nonfinite skip skips such batches instead."
                )
            self.skipped_batches += 1
            self._window[1] += 1
            if not finite:  # said once, by the process that had the batch
                log.warning(f"Skipped the update of {where}: non-finite loss; {culprit}.")
            self.log("train/skipped_batches", float(self.skipped_batches))
            # Not `return None` (Lightning refuses it under DDP): a loss of zero gradient for every
            # trained weight, whatever its value, so every process still exchanges gradients.
            return torch.stack([p.sum() for p in self._trainable_params()]).sum() * 0.0
        self._window[0] += 1
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self._step_loss = loss.detach()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A step of skipped batches alone changes nothing: with no gradients AdamW leaves the
        weights and moments be (zero ones would still move them). Every process decides alike."""
        kept, skipped = self._window
        self._window = [0, 0]
        if skipped and not kept:
            for p in self._trainable_params():
                p.grad = None

    def _trainable_params(self) -> list[Tensor]:
        if self._trainable is None:  # once: the model has thousands of parameters to walk
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        return self._trainable

    def on_train_start(self) -> None:
        # A resume under another step limit (a finished run given more epochs) restores a
        # schedule that ends elsewhere, for a finished run already at learning rate 0.
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, WarmupCosine) and self._planned_steps is not None:
            if message := scheduler.replan(self._planned_steps):
                rank_zero_info(message)

    def on_fit_start(self) -> None:
        """Start from `init_adapter` (a new run only: a resume restores its own weights); record
        the run's settings in TensorBoard's HPARAMS tab against its validation scores."""
        if self.ensemble_dir is not None:
            raise CheckpointError("--model.ensemble scores cv's fold adapters: it is for validate, test, predict and "
                                  "ask, not fit")
        if self.init_adapter and self.trainer.ckpt_path is None:
            trainable = dict((name, p) for name, p in self.named_parameters() if p.requires_grad)
            weights = starting_weights(Path(self.init_adapter), self.lora, base_fingerprint(self.model, self.pretrained),
                                       {name: p.shape for name, p in trainable.items()})
            with torch.no_grad():
                for name, p in trainable.items():
                    p.copy_(weights[name])
            rank_zero_info(f"Started from the adapter in {self.init_adapter}: a new run, fresh optimizer and schedule.")
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            dm = self.trainer.datamodule
            settings = {f"model/{k}": v for k, v in self.hparams.items()}
            settings.update({f"data/{k}": v for k, v in (dm.hparams.items() if dm is not None else [])})
            write_hparams(self.logger, settings, ["val/acc", "val/macro_f1", "val/ece", "val/loss"])

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self._trainable_params())
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        self._planned_steps = scheduler.total_steps if isinstance(scheduler, WarmupCosine) else None
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["medqa_base"] = base_fingerprint(self.model, self.pretrained)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, before any step, a checkpoint made with another base model, other LoRA
        settings or other answer tokens, naming what differs."""
        if "PubMedQADataModule" in checkpoint:  # the DataModule's name before medqa had a second task
            checkpoint.setdefault("QADataModule", checkpoint.pop("PubMedQADataModule"))
        differs = misfits(checkpoint, self.lora, {"labels": self.labels, "label_ids": self.label_ids},
                          base_fingerprint(self.model, self.pretrained),
                          {name: p.shape for name, p in self.named_parameters() if p.requires_grad})
        if differs:
            raise CheckpointMismatch("the checkpoint does not fit this run's model: " + "; ".join(differs))
