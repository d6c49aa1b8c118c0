"""The `LightningDataModule`: a task's records (`medqa.tasks`), split and tokenized
(`medqa.tokens`), in batches whose order `medqa.samplers` keeps."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from medqa import prompts
from medqa.cache import ExampleCache, TokenizedSplit, examples_sha256, source_digest, tokenizer_digest
from medqa.prompts import Reasoning, Target
from medqa.records import DataError
from medqa.samplers import LongestFirst, ResumableSampler
from medqa.tasks import Record, get_task
from medqa.tasks.task import counts_text, without_held_out
from medqa.tokens import Example, PromptFormat, collate


PredictSplit = Literal["train", "dev", "test", "all"]


# ------------------------------------------------------------------------ DataModule


class QADataModule(L.LightningDataModule):
    """A question-answering task for LoRA fine-tuning: reads, splits and tokenizes; batches
    padded per batch (evaluation batches longest first, see `LongestFirst`).

    Args:
        task: Which task (`medqa.tasks`): `pubmedqa` (yes / no / maybe over an abstract) or
            `medqa_usmle` (MedQA-USMLE, 4 options A-D).
        source: Where the task's records are: its hub id (the default), a local file or
            folder in its published schema, or `synthetic` (the embedded demo set). Dev and
            test always come from it. PubMedQA: `qiaojin/PubMedQA`, `ori_pqal.json`, or a
            hub-schema `.json` / `.jsonl`. MedQA-USMLE: the folder of its
            `*_train.jsonl`, `*_dev.jsonl` and `*_test.jsonl`.
        hub_config: Hub configuration of `source` when it is a hub id (default: the task's).
        train_source: Train on this instead of the official training split (e.g. PQA-A:
            `qiaojin/PubMedQA` with `train_hub_config: pqa_artificial`, or `ori_pqaa.json`).
        train_hub_config: Hub configuration of `train_source`.
        fold: Which official cross-validation fold is the dev set (PubMedQA: 0-9; a task
            with a fixed dev set: 0).
        target: What the model learns to write: the decision word alone, or the long
            answer followed by the decision.
        reasoning: PubMedQA's setting: `required` (the official task: the abstract without its
            conclusion) or `free` (the paper's reasoning-free setting: the conclusion follows the
            abstract, so the answer can be read; shows quickly whether training learns at all).
        system_prompt: The system turn (or the plain prompt's first paragraph); by default the
            task's. Saved with every checkpoint; a checkpoint trained under another is refused.
        instruction: The line after the question that asks for the answer; by default the
            task's. Saved likewise.
        pretrained: Tokenizer to use; linked to `model.pretrained`, not set here.
        max_length: Longest example in tokens; longer abstracts are cut. Also the model's.
        batch_size: Examples per training batch.
        eval_batch_size: Examples per validation / test / predict batch.
        predict_split: Which split `predict` answers.
        num_workers: DataLoader worker processes.
        shuffle_seed: Seed for the training order.
        bucket_batches: Length-aware training batches: the shuffled order is cut into runs
            of this many batches, each sorted by length, and the batches are shuffled again
            (less padding, still random). 0: plain random batches.
        balance_classes: Weight each training question's loss by its class's rarity in the
            training split (total / (classes x class count)), so each class weighs the same in
            all. Macro-F1 rewards every class alike; PQA-L's training split is 55% "yes" and 11%
            "maybe", and a model trained without it learns to answer "yes".
        drop_eval_overlap: Leave out of `train_source` its questions that are also dev or test
            questions (same id or same question text), saying how many. Without it such a
            source is refused: training on test questions inflates every score.
        cache_dir: Where tokenized examples are kept (`medqa.cache`): built once for the
            sources' bytes, task, tokenizer, prompt, target, reasoning and max_length, then
            memory-mapped by later runs, resumes, evaluations and every DDP process. Default:
            `$MEDQA_CACHE/examples`, else `~/.cache/medqa/examples`.
    """

    def __init__(
        self,
        task: str = "pubmedqa",
        source: str | None = None,
        hub_config: str | None = None,
        train_source: str | None = None,
        train_hub_config: str | None = None,
        fold: int = 0,
        target: Target = "decision",
        reasoning: Reasoning = "required",
        system_prompt: str | None = None,
        instruction: str | None = None,
        pretrained: str = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
        max_length: int = 1024,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        predict_split: PredictSplit = "test",
        num_workers: int = 0,
        shuffle_seed: int = 0,
        bucket_batches: int = 16,
        balance_classes: bool = False,
        drop_eval_overlap: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.task = get_task(task)
        if not 0 <= fold < self.task.folds:
            raise DataError(f"--data.fold must be in 0..{self.task.folds - 1} for {task}, got {fold}")
        for name, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                   ("max_length", max_length, 32), ("num_workers", num_workers, 0)):
            if value < least:
                raise DataError(f"--data.{name} must be {least} or more, got {value}")
        system_prompt = self.task.system_prompt if system_prompt is None else system_prompt
        instruction = self.task.instruction if instruction is None else instruction
        for name, text in (("system_prompt", system_prompt), ("instruction", instruction)):
            if prompts.CONTEXT_PLACEHOLDER in text:
                raise DataError(f"--data.{name} contains medqa's internal context marker; remove it")
        self.prompt = prompts.PromptSettings(self.task.name, system_prompt, instruction, self.task.labels)
        self.save_hyperparameters()
        self.source = self.task.default_source if source is None else source
        self.hub_config = self.task.default_hub_config if hub_config is None else hub_config
        self.train_source, self.train_hub_config = train_source, train_hub_config
        self.fold, self.target, self.pretrained, self.max_length = fold, target, pretrained, max_length
        self.reasoning = reasoning
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.predict_split, self.num_workers, self.shuffle_seed = predict_split, num_workers, shuffle_seed
        if bucket_batches < 0:
            raise DataError(f"--data.bucket_batches must be 0 (off) or more, got {bucket_batches}")
        self.bucket_batches, self.drop_eval_overlap = bucket_batches, drop_eval_overlap
        self.balance_classes = balance_classes
        self._class_weights: list[float] | None = None
        self.format: PromptFormat | None = None
        self.cache_dir = cache_dir
        self.cache: ExampleCache | None = None
        self.built_cache = False  # whether this process's setup tokenized the examples (else: mapped them)
        self.examples: dict[str, TokenizedSplit] = {}
        self.train_sampler: ResumableSampler | None = None
        self._position: dict[str, Any] | None = None  # a resumed run's place in the order
        self._identity: dict[str, Any] | None = None
        self.stage: str | None = None  # the stage of the last setup: a resume is checked for fit only

    @property
    def formatter(self) -> PromptFormat:
        """The task's prompt in this run's tokenizer, loaded on first use."""
        if self.format is None:
            from medqa.backends import load_tokenizer

            self.format = PromptFormat(load_tokenizer(self.pretrained), self.target, self.max_length, self.task,
                                       self.prompt, self.reasoning)
        return self.format

    @property
    def answer_tokens(self) -> dict[str, Any]:
        """What the model needs to score and generate answers, linked to `model.answer_tokens`
        when the CLI builds both: the label words, their token ids, the pad id and the tokens
        that ask for a rationale."""
        return {"labels": list(self.prompt.labels), "label_ids": self.formatter.label_token_ids(), "pad_id": self.pad_id,
                "rationale_suffix": self.formatter.rationale_suffix_ids()}

    def setup(self, stage: str) -> None:
        self.stage = stage
        fmt = self.formatter  # the tokenizer first: a missing one fails before any file is read
        if self.examples:
            return
        from medqa.tiny import cache_dir as medqa_cache

        read = cache(self.task.read)  # records read for a key's digest are kept for the build
        self.cache = ExampleCache(Path(self.cache_dir).expanduser() if self.cache_dir else medqa_cache() / "examples",
                                  self._cache_key(read))
        limits = {"max_length": self.max_length, "vocab": len(fmt.tokenizer), "labels": len(self.prompt.labels)}
        self.examples, counts, self.built_cache = self.cache.get(lambda: self._tokenize(read), limits)
        folds = f" (fold {self.fold} is dev)" if self.task.folds > 1 else ""
        rank_zero_info(f"Read {counts['all']['examples']} {self.task.name} records from {self.source}{folds}"
                       + (f"; tokenized into {self.cache.folder}." if self.built_cache else f", tokenized, from {self.cache.folder}."))
        if counts["train"].get("left_out"):
            rank_zero_info(f"Left out {counts['train']['left_out']} questions of {self.train_source} that are dev or "
                           "test questions (--data.drop_eval_overlap).")
        for name, c in counts.items():
            if name != "all":
                rank_zero_info(f"  {name}: {c['examples']} records from {c['origin']} ({c['labels']}); "
                               f"{c['examples']} used, {c['cut']} with the passage cut to fit {self.max_length} tokens")
        if stage == "fit" and not len(self.examples["train"]):  # Lightning would train nothing and exit 0
            why = (f"every question of {self.train_source} is a dev or test question (--data.drop_eval_overlap left "
                   "them all out)" if self.train_source is not None else
                   f"{self.source} has no training split" + (" (a folder needs its ..._train.jsonl)"
                                                              if self.task.name == "medqa_usmle" else ""))
            raise DataError(f"nothing to train on: {why}; point --data.source (or --data.train_source) at training "
                            "questions")
        if self.balance_classes:
            per_label = np.bincount(self.examples["train"].label, minlength=len(self.prompt.labels)).tolist()
            present = sum(c > 0 for c in per_label)
            self._class_weights = [sum(per_label) / (present * c) if c else 0.0 for c in per_label]
            if stage == "fit":
                rank_zero_info("  training loss weights (--data.balance_classes): "
                               + ", ".join(f"{w} {x:.2f}" for w, x in zip(self.prompt.labels, self._class_weights)))

    def _cache_key(self, read: Callable[[str, str | None], list[Record]]) -> dict[str, Any]:
        """Everything the tokenized examples depend on (`medqa.cache`)."""
        def source(name: str | None, config: str | None) -> str | None:
            return None if name is None else source_digest(name, config, lambda: read(name, config))

        return {"task": self.task.name, "source": source(self.source, self.hub_config),
                "train_source": source(self.train_source, self.train_hub_config),
                "fold": self.fold, "drop_eval_overlap": self.drop_eval_overlap,
                "tokenizer": tokenizer_digest(self.formatter.tokenizer), "prompt": self.prompt.as_dict(),
                "target": self.target, "reasoning": self.reasoning, "max_length": self.max_length}

    def _tokenize(self, read: Callable[[str, str | None], list[Record]]) -> dict[str, tuple[Iterable[Example], dict[str, Any]]]:
        """Each split's examples (tokenized as they are written) and what the cache keeps of
        its records: their source, label counts and, for a training source (read a record at
        a time where the task can), the questions left out (`drop_eval_overlap`)."""
        records = read(self.source, self.hub_config)
        splits: dict[str, Iterable[Record]] = {**self.task.split(records, self.fold), "all": records}
        counts: dict[str, dict[str, Any]] = {
            name: {"origin": self.source, "records": len(recs), "left_out": 0,
                   "labels": counts_text(self.task.label_counts(recs))}
            for name, recs in splits.items()}
        if self.train_source is not None:
            local = self.task.stream is not None and Path(self.train_source).expanduser().is_file()
            stream = (self.task.stream if local else read)(self.train_source, self.train_hub_config)
            counts["train"] = {"origin": self.train_source, "records": None}  # the rest as it is read
            splits["train"] = without_held_out(stream, [*splits["dev"], *splits["test"]], self.drop_eval_overlap,
                                               self.train_source, self.source, counts["train"], self.task.labels)
        return {name: (self.formatter.encode_many(recs), counts[name]) for name, recs in splits.items()}

    @property
    def pad_id(self) -> int:
        tok = self.formatter.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def class_weights(self) -> list[float] | None:
        """Each label's loss weight under `balance_classes` (None without it), set by `setup`:
        total / (classes x count) over the training split; a label it lacks weighs 0 (no
        example carries it)."""
        return self._class_weights

    def longest_batch_tokens(self) -> int:
        """Token positions of the largest training batch the data can produce: a full batch of
        its longest examples, padded. 0 before `setup("fit")`."""
        return self.micro_batch_tokens(self.batch_size)

    def micro_batch_tokens(self, batch_size: int) -> int:
        """`longest_batch_tokens` for batches of `batch_size` questions."""
        train = self.examples.get("train")
        longest = sorted(train.lengths() if train is not None else [], reverse=True)[:batch_size]
        return len(longest) * (longest[0] if longest else 0)

    def decode(self, ids: list[int]) -> str:
        return self.formatter.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _processes(self) -> tuple[int, int]:
        """(number of processes, this one's rank): the samplers split the data themselves."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _loader(self, split: str, batch_size: int, sampler: Sampler[int] | None = None) -> DataLoader:
        examples = self.examples[split]
        world, rank = self._processes()
        return DataLoader(
            examples,
            batch_size=batch_size,
            sampler=sampler or LongestFirst(examples.lengths(), batch_size, world, rank),
            collate_fn=partial(collate, pad_id=self.pad_id,
                               longest=self.longest_batch_tokens() if sampler is not None else None,
                               class_weights=self.class_weights() if sampler is not None else None),
            num_workers=self.num_workers,
        )

    def _resumable_sampler(self) -> ResumableSampler:
        """The one training sampler, made on first use (by the loader or by a resume)."""
        if self.train_sampler is None:
            train = self.examples["train"]
            world, rank = self._processes()
            self.train_sampler = ResumableSampler(len(train), self.shuffle_seed, train.lengths(),
                                                  self.batch_size, self.bucket_batches, world, rank)
            position, self._position = self._position, None
            try:
                if position is not None:
                    self.train_sampler.load_state_dict(position)
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # a saved position is untrusted
                raise DataError(f"cannot resume the training order: the checkpoint's training data differs ({e}); "
                                "resume with the same --data settings") from None
        return self.train_sampler

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self._resumable_sampler())

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, self.eval_batch_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for each batch as a step takes it (not when Lightning prefetches it), so the
        # sampler's count is exactly the position a resumed run must continue from.
        if batch.get("train") and self.train_sampler is not None:
            self.train_sampler.took_batch()
        return batch

    def identity(self) -> dict[str, Any]:
        """What a resumed fit must train on again: the example settings, the examples' cache key, the dev questions."""
        if self._identity is None:
            dev = hashlib.sha256("\n".join(self.examples["dev"].ids).encode())
            self._identity = {"task": self.task.name, "source": self.source, "train_source": self.train_source, "fold": self.fold,
                              "target": self.target, "reasoning": self.reasoning, "max_length": self.max_length,
                              "balance_classes": self.balance_classes, "examples_key": self.cache.digest,
                              "dev_sha256": dev.hexdigest()}
        return self._identity

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"target": self.target, "reasoning": self.reasoning, "max_length": self.max_length,
                                 "prompt": self.prompt.as_dict()}
        if self.examples:
            state["identity"] = self.identity()
        if self.train_sampler is not None and self.stage == "fit":
            # At an epoch's end this names the finished epoch; Lightning resumes with the next
            # one, whose set_epoch starts it from the beginning.
            state["train_position"] = self.train_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, ours, default in (("target", self.target, self.target), ("reasoning", self.reasoning, "required")):
            theirs = state.get(name, default)  # a checkpoint from before `reasoning` was saved: required
            if theirs != ours:
                raise DataError(f"the checkpoint was trained with --data.{name} {theirs!r}, this run uses {ours!r}; "
                                f"pass --data.{name} {theirs} so the prompt matches")
        self.check_prompt(state.get("prompt"))
        position = state.get("train_position")
        fitting = self.stage == "fit"
        if fitting and "identity" in state and "train" in self.examples:
            if not isinstance(state["identity"], dict):
                raise DataError(f"the checkpoint's saved data identity is a {type(state['identity']).__name__}, not a "
                                "mapping: the file was damaged or edited")
            self._check_identity(state["identity"])
        if position is not None and fitting and "train" in self.examples:
            # Taken up when the training loader is made: a resume trains on the micro-batch its
            # checkpoint did (`medqa.memory.MicroBatch`, restored after the data).
            self.train_sampler, self._position = None, position

    def check_prompt(self, saved: Any) -> None:
        """Refuse a checkpoint trained under other prompt settings than this run's, naming
        each difference. A checkpoint from before medqa saved them is taken as is."""
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise DataError(f"the checkpoint's saved prompt settings are a {type(saved).__name__}, not a mapping")
        differs = prompts.prompt_differences(saved, self.prompt.as_dict())
        if differs:
            raise DataError(
                "the checkpoint was trained with other prompt settings (" + "; ".join(differs) + "); pass the "
                "checkpoint's as --data.system_prompt / --data.instruction, or train under the new prompt"
            )

    def _check_identity(self, theirs: dict[str, Any]) -> None:
        """Refuse to resume a fit on other data, naming what differs."""
        ours = self.identity()
        settings = ("task", "fold", "target", "reasoning", "max_length", "balance_classes")
        named = [f"{k}: checkpoint {theirs[k]!r}, this run {ours[k]!r}" for k in settings if k in theirs and theirs[k] != ours[k]]
        if "train_sha256" in theirs and "examples_key" not in theirs:
            ours = {**ours, "train_sha256": examples_sha256(self.examples["train"])}
        digests = [k for k in ("examples_key", "train_sha256", "dev_sha256") if k in theirs and theirs[k] != ours[k]]
        if not named and not digests:
            return
        sources = [f"{k}: checkpoint {theirs.get(k)!r}, this run {ours[k]!r}" for k in ("source", "train_source")
                   if theirs.get(k) != ours[k]]
        what = {"examples_key": "the tokenized examples (sources, tokenizer or prompt)",
                "train_sha256": "the tokenized training examples", "dev_sha256": "the dev questions"}
        raise DataError(
            "cannot resume: the checkpoint was trained on other data ("
            + "; ".join(named + [f"{what[k]} differ" for k in digests] + sources)
            + "). Resume with the run's own --data settings and tokenizer, or start a new run"
        )


def checkpoint_prompt(checkpoint: dict[str, Any]) -> Any:
    """The prompt settings a checkpoint's DataModule state saved, as saved (untrusted); None
    where it saved none."""
    state = checkpoint.get(QADataModule.__qualname__)
    return state.get("prompt") if isinstance(state, dict) else None
