"""PubMedQA data: readers for the hub and local files, the official split, tokenization
with answer-only labels, per-batch padding and the `LightningDataModule`."""

from __future__ import annotations

import hashlib
import json
import math
import random
from array import array
from functools import partial
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from medqa import prompts
from medqa.prompts import LABELS, Target

HUB_DATASET = "qiaojin/PubMedQA"
SYNTHETIC = "synthetic"
"""`--data.source synthetic`: the embedded demo set (see `medqa.demo`)."""

Split = Literal["train", "dev", "test"]
PredictSplit = Literal["train", "dev", "test", "all"]


class DataError(ValueError):
    """Input that medqa cannot use, with where it came from and what was expected."""


@dataclass(frozen=True)
class Record:
    """One PubMedQA question, whatever file or hub schema it came from."""

    id: str
    question: str
    contexts: list[str]
    context_labels: list[str]
    long_answer: str
    decision: str

    @property
    def label(self) -> int:
        return LABELS.index(self.decision)


# ---------------------------------------------------------------------------- reading


def _field(raw: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(raw)})")
    return raw[key]


def _str_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of strings, got {type(value).__name__}")
    return value


def _text(value: Any, key: str, where: str) -> str:
    """A string that can be written as UTF-8 (JSON's \\ud800 escapes give lone surrogates,
    which the tokenizer would fail on later, far from the record)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {key!r} holds text that is not valid Unicode ({e.reason} at "
                        f"character {e.start}, e.g. an unpaired \\ud800-\\udfff escape)") from None
    return value


def record_id(rid: Any, key: str, where: str) -> str:
    """A question id: a non-empty string or an integer, as PubMedQA's PMIDs are."""
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        raise DataError(f"{where}: field {key!r} must be a non-empty string or an integer id, got {rid!r}")
    return _text(str(rid), key, where)


def make_record(
    rid: Any,
    question: Any,
    contexts: Any,
    context_labels: Any,
    long_answer: Any,
    decision: Any,
    where: str,
    names: tuple[str, str, str, str, str] = ("question", "contexts", "labels", "long_answer", "final_decision"),
    id_name: str = "pubid",
) -> Record:
    """Check one record's fields and build it; `names` are the fields as the source spells them."""
    q_name, c_name, l_name, a_name, d_name = names
    rid = record_id(rid, id_name, where)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field {q_name!r} must be a non-empty question, got {question!r}")
    contexts = _str_list(contexts, c_name, where)
    context_labels = _str_list(context_labels, l_name, where) if context_labels is not None else []
    if context_labels and len(context_labels) != len(contexts):
        raise DataError(
            f"{where}: {len(contexts)} {c_name!r} but {len(context_labels)} section {l_name!r}; "
            "expected one section name per context"
        )
    if not isinstance(long_answer, str):
        raise DataError(f"{where}: field {a_name!r} must be a string, got {type(long_answer).__name__}")
    if decision not in LABELS:
        raise DataError(f"{where}: field {d_name!r} must be one of yes/no/maybe, got {decision!r}")
    for value, key in [(question, q_name), (long_answer, a_name), *((c, c_name) for c in contexts),
                       *((c, l_name) for c in context_labels)]:
        _text(value, key, where)
    return Record(rid, question.strip(), contexts, context_labels, long_answer, decision)


def _from_original(pmid: str, raw: Any, where: str) -> Record:
    """The PubMedQA repository's schema: `{PMID: {QUESTION, CONTEXTS, LABELS, ...}}`."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with QUESTION, CONTEXTS, ..., got {type(raw).__name__}")
    return make_record(
        pmid,
        _field(raw, "QUESTION", where),
        _field(raw, "CONTEXTS", where),
        raw.get("LABELS"),
        _field(raw, "LONG_ANSWER", where),
        _field(raw, "final_decision", where),
        where,
        ("QUESTION", "CONTEXTS", "LABELS", "LONG_ANSWER", "final_decision"),
        "PMID",
    )


def _from_hub(raw: Any, where: str) -> Record:
    """The hub's schema: `{pubid, question, context: {contexts, labels}, long_answer, final_decision}`."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with pubid, question, context, ..., got {type(raw).__name__}")
    context = _field(raw, "context", where)
    if not isinstance(context, dict):
        raise DataError(f"{where}: field 'context' must be an object with 'contexts' and 'labels', got {type(context).__name__}")
    return make_record(
        _field(raw, "pubid", where),
        _field(raw, "question", where),
        _field(context, "contexts", f"{where}, field 'context'"),
        context.get("labels"),
        _field(raw, "long_answer", where),
        _field(raw, "final_decision", where),
        where,
        ("question", "context.contexts", "context.labels", "long_answer", "final_decision"),
    )


def _check_unique(records: list[Record], origin: str) -> list[Record]:
    seen: set[str] = set()
    for i, r in enumerate(records):
        if r.id in seen:
            raise DataError(f"{origin}: record {i}: id {r.id!r} appears more than once; ids must be unique")
        seen.add(r.id)
    return records


def _unique_keys(where: str, error: type[ValueError] = DataError):
    """A json object hook that refuses repeated keys, which json.loads would silently keep
    only the last of."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"{where}: key {key!r} appears more than once in one object; keys (ids, fields) "
                            "must be unique")
            obj[key] = value
        return obj

    return hook


def parse_json(text: str, where: str, error: type[ValueError] = DataError) -> Any:
    """`json.loads` refusing repeated keys and saying where a file is not JSON or is nested
    deeper than the parser allows."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(where, error))
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to read (thousands of levels of [ or {{); not a PubMedQA file") from None


def read_file(path: str | Path) -> list[Record]:
    """Read PubMedQA records from a local file, in file order.

    Accepted: the original `ori_pqal.json` / `ori_pqaa.json` (one object keyed by PMID),
    a JSON list of records in the hub's schema, or JSON Lines in the hub's schema.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected ori_pqal.json, a hub-schema .json or .jsonl)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")

    if path.suffix == ".jsonl":
        records = []
        # JSON Lines ends records at "\n" only (splitlines would also cut at U+0085, U+2028...).
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            raw = parse_json(line, f"{path}: line {n}")
            records.append(_from_hub(raw, f"{path}: line {n}"))
        return _check_unique(records, str(path))

    data = parse_json(text, str(path))
    if isinstance(data, dict):
        # The official split needs file order, which dicts keep.
        return [_from_original(pmid, raw, f"{path}: record {pmid!r}") for pmid, raw in data.items()]
    if isinstance(data, list):
        records = [_from_hub(raw, f"{path}: record {i}") for i, raw in enumerate(data)]
        return _check_unique(records, str(path))
    raise DataError(
        f"{path}: top level is a {type(data).__name__}; expected an object keyed by PMID "
        "(ori_pqal.json) or a list of hub-schema records"
    )


def read_hub(dataset_id: str, config: str) -> list[Record]:
    """Read a PubMedQA configuration from the Hugging Face hub (or its local cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config, split="train")
    except Exception as e:  # datasets raises many types for "not reachable / not cached"
        raise DataError(
            f"hub dataset {dataset_id!r} (config {config!r}) could not be loaded: {type(e).__name__}: {e}\n"
            "Without network access, download the files once and point --data.source at a local copy "
            "(ori_pqal.json from the PubMedQA repository, or a .json/.jsonl in the hub's schema), "
            "or set HF_HUB_OFFLINE=1 to use a dataset already in the Hugging Face cache."
        ) from None
    records = [_from_hub(dict(row), f"hub {dataset_id}/{config}: row {i}") for i, row in enumerate(ds)]
    return _check_unique(records, f"hub {dataset_id}/{config}")


def read_source(source: str, hub_config: str) -> list[Record]:
    """Records from `source`: 'synthetic', a local file, or a hub dataset id."""
    if source == SYNTHETIC:
        from medqa.demo import synthetic_records

        return synthetic_records()
    path = Path(source).expanduser()
    if path.exists() or path.suffix in (".json", ".jsonl") or source.startswith((".", "/", "~")):
        return read_file(path)
    return read_hub(source, hub_config)


# ------------------------------------------------------------------ the official split


def _split_label(pmids: list[str], fold: int, rng: random.Random) -> list[list[str]]:
    rng.shuffle(pmids)
    size = math.ceil(len(pmids) / fold)
    return [pmids[i * size : (i + 1) * size] if i < fold - 1 else pmids[i * size :] for i in range(fold)]


def _split(decisions: dict[str, str], fold: int, rng: random.Random) -> list[dict[str, str]]:
    """The PubMedQA authors' stratified split (their `preprocess/split_dataset.py`)."""
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for pmid, decision in decisions.items():
        by_label[decision].append(pmid)
    chunks = {label: _split_label(pmids, fold, rng) for label, pmids in by_label.items()}
    subsets = [
        {pmid: decisions[pmid] for label in LABELS for pmid in chunks[label][i]} for i in range(fold)
    ]
    if len(subsets[-1]) != len(subsets[0]):
        if not all(subsets[:-1]):
            raise DataError(f"{len(decisions)} records are too few for PubMedQA's {fold}-way split (PQA-L has 1,000)")
        for subset in subsets[:-1]:
            picked = rng.choice(list(subset))
            subsets[-1][picked] = subset.pop(picked)
    return subsets


def official_split(records: Sequence[Record], fold: int = 0) -> dict[Split, list[Record]]:
    """PQA-L's official split: 500 test questions; the rest in 10 folds, `fold` the dev set.

    Follows the procedure in the PubMedQA repository: it depends on the records' order,
    which must be the order of `ori_pqal.json`.
    """
    if not 0 <= fold < 10:
        raise DataError(f"--data.fold must be in 0..9, got {fold}")
    rng = random.Random(0)
    cv_pool, test = _split({r.id: r.decision for r in records}, 2, rng)
    folds = _split(cv_pool, 10, rng)
    by_id = {r.id: r for r in records}
    dev_ids = set(folds[fold])
    return {
        "train": [by_id[i] for i in cv_pool if i not in dev_ids],
        "dev": [by_id[i] for i in folds[fold]],
        "test": [by_id[i] for i in test],
    }


# ---------------------------------------------------------------------- tokenization


@dataclass
class Example:
    """A tokenized record: `labels` are -100 outside the answer; `answer_pos` indexes the
    first token of the decision word, whose logits are read at `answer_pos - 1`."""

    id: str
    input_ids: list[int]
    labels: list[int]
    answer_pos: int
    label: int
    truncated: bool = False


@dataclass
class PromptFormat:
    """Turns records into token ids with one tokenizer and one answer target."""

    tokenizer: Any
    target: Target = "decision"
    max_length: int = 1024
    chat: bool = field(init=False)

    def __post_init__(self) -> None:
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self._end = self._end_of_answer()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _after_answer(self, turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
        """What the chat template writes after an assistant answer, up to the end of `turns`
        (the turns that follow it), as text."""
        marker = "MEDQA_ANSWER_MARKER"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}, *turns],
            tokenize=False, add_generation_prompt=generation_prompt,
        )
        return text[text.rindex(marker) + len(marker) :]

    def _end_of_answer(self) -> list[int]:
        if self.chat:
            # The chat template closes the assistant turn with its own end-of-turn token.
            tail = self._after_answer([])
            ids = self._encode(tail.strip() or tail)
            if ids:
                return ids
        if self.tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-sequence token; one is needed to end the answer")
        return [self.tokenizer.eos_token_id]

    def _prompt_parts(self, question: str) -> tuple[str, str]:
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                prompts.chat_messages(question), tokenize=False, add_generation_prompt=True
            )
        else:
            bos = self.tokenizer.bos_token or ""
            text = bos + prompts.plain_prompt(question)
        prefix, suffix = text.split(prompts.CONTEXT_PLACEHOLDER, 1)  # the abstract comes first
        return prefix, suffix

    def rationale_suffix_ids(self) -> list[int]:
        """Tokens that follow the decision word to ask for a rationale: the end of the
        assistant's turn, a user turn with the request, and the assistant's turn opening."""
        if not self.chat:
            return self._encode(prompts.plain_rationale_request())
        return self._encode(self._after_answer([{"role": "user", "content": prompts.RATIONALE_REQUEST}],
                                               generation_prompt=True))

    def label_token_ids(self) -> list[list[int]]:
        """Token ids of each label word as written at the scoring position."""
        return [self._encode(prompts.label_surface(w, self.target, self.chat)) for w in LABELS]

    def encode(self, record: Record) -> Example:
        """Tokenize one record; when too long, only the abstract is cut (from its end)."""
        prefix, suffix = self._prompt_parts(record.question)
        pre, post = self._encode(prefix), self._encode(suffix)
        context = self._encode(prompts.format_contexts(record.contexts, record.context_labels))
        head = self._encode(prompts.answer_head(record.long_answer, self.target, self.chat))
        word = self.label_token_ids()[record.label]
        fixed = len(pre) + len(post) + len(head) + len(word) + len(self._end)
        budget = self.max_length - fixed
        if budget < 0:
            raise DataError(
                f"record {record.id!r}: the prompt without the abstract plus the answer takes {fixed} "
                f"tokens, more than --data.max_length {self.max_length}; raise max_length"
            )
        truncated = len(context) > budget
        context = context[:budget]
        prompt = pre + context + post
        answer = head + word + self._end
        return Example(
            id=record.id,
            input_ids=prompt + answer,
            labels=[-100] * len(prompt) + answer,
            answer_pos=len(prompt) + len(head),
            label=record.label,
            truncated=truncated,
        )


def collate(examples: Sequence[Example], pad_id: int, pack: bool = False) -> dict[str, Any]:
    """Right-pad a batch to its own longest example, or, with `pack`, join its examples into
    one row without padding (training only; see `pack_examples`)."""
    if pack:
        return pack_examples(examples)
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    # Positions whose next token is an answer token, flattened over (batch, time).
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    return {
        "ids": [e.id for e in examples],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "answer_pos": torch.tensor([e.answer_pos for e in examples]),
        "label": torch.tensor([e.label for e in examples]),
        "loss_pos": rows * width + cols,
        "loss_targets": labels[rows, cols + 1],
        "num_tokens": sum(len(e.input_ids) for e in examples),
    }


def pack_examples(examples: Sequence[Example]) -> dict[str, Any]:
    """A training batch as one row: the examples one after another, no padding.

    `position_ids` restart at 0 for each example; with no attention mask, both backends
    read them as packed sequences and keep attention inside each example (transformers'
    masking utilities and Unsloth build a block-diagonal causal mask, or use variable-length
    flash attention). The loss positions never cross from one example into the next, so
    the loss equals the padded batch's.
    """
    input_ids = torch.tensor([t for e in examples for t in e.input_ids]).unsqueeze(0)
    labels = torch.tensor([t for e in examples for t in e.labels]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(e.input_ids)) for e in examples]).unsqueeze(0)
    # Answer positions: next token an answer token, within the same example.
    follows = (labels[0, 1:] != -100) & (position_ids[0, 1:] != 0)
    cols = torch.nonzero(follows).squeeze(1)
    return {
        "ids": [e.id for e in examples],
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": position_ids,
        "labels": labels,
        "label": torch.tensor([e.label for e in examples]),
        "loss_pos": cols,
        "loss_targets": labels[0, cols + 1],
        "num_tokens": input_ids.size(1),
    }


def bucketed_order(order: list[int], lengths: Sequence[int], batch_size: int, bucket_batches: int,
                   generator: torch.Generator) -> list[int]:
    """Length-aware batches: `order` cut into runs of `bucket_batches` batches, each run
    sorted by length and cut into batches, then all batches shuffled. Batches hold examples
    of similar length (little padding) and still come in random order. A short last batch
    stays last, so the DataLoader's batches are exactly these."""
    run = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), run):
        chunk = sorted(order[start : start + run], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    last = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled + last for i in batch]


class ResumableSampler(DistributedSampler):
    """A shuffle whose order is a function of (seed, epoch) alone, so a run resumed
    mid-epoch sees the rest of that epoch in the order a run never stopped would.

    Lightning calls `set_epoch` at each epoch start. The first `skip` examples of the
    epoch's order are left out of the next iteration only (set when resuming). With
    `lengths` and `bucket_batches`, the order is length-bucketed (`bucketed_order`), still a
    function of (seed, epoch).

    Across `num_replicas` processes (DDP), each step takes the next `batch_size *
    num_replicas` examples of the one order and gives each process its `batch_size`, so
    the processes of a step get examples of similar length. The order is padded with its
    first examples to a multiple of `num_replicas`, so every process runs the same number
    of steps. It is a `DistributedSampler`, so Lightning uses it as it is.

    No batch holds a single example unless `batch_size` is 1: where the epoch's last step
    would give each process one example, each gets one more from the start of the epoch's
    order. A batch of one makes torch.compile specialise on size 1 and compile Unsloth's
    kernels again; on 2 x H200 that one step took 19.6 s, the other steps 0.38 s (PQA-L's
    450 training questions, batch 8 on each of 2 or 4 GPUs, end every epoch that way).
    """

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1,
                 bucket_batches: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.size, self.seed = size, seed
        self.lengths, self.batch_size, self.bucket_batches = lengths, batch_size, bucket_batches
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def _padding(self) -> int:
        """Examples repeated at the end of each epoch: to a multiple of the processes, and one
        more each where the last batch would hold one example."""
        pad = -self.size % self.num_replicas  # every process the same number of steps
        if self.batch_size > 1 and (self.size + pad) % (self.batch_size * self.num_replicas) == self.num_replicas:
            pad += self.num_replicas
        return pad

    def __len__(self) -> int:
        return (self.size + self._padding()) // self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        step = self.batch_size * self.num_replicas
        if self.bucket_batches > 0 and self.lengths is not None:
            order = bucketed_order(order, self.lengths, step, self.bucket_batches, generator)
        order += [order[i % len(order)] for i in range(self._padding())] if order else []
        start, self.skip = self.skip, 0  # the padding comes from the whole epoch, resumed or not
        order = order[start:]
        if self.num_replicas == 1:
            return iter(order)
        mine = []
        for s in range(0, len(order), step):
            chunk = order[s : s + step]
            share = len(chunk) // self.num_replicas
            mine += chunk[self.rank * share : (self.rank + 1) * share]
        return iter(mine)


class LongestFirst(DistributedSampler):
    """Evaluation order: longest examples first. Each batch then holds examples of similar
    length (little padding), and the largest batch runs first, so a batch that does not fit
    in memory fails at once. Scores do not depend on the order; `predict` writes its files
    back in the data's order.

    Across `num_replicas` processes, batch k goes to process k mod `num_replicas` (question k
    when there are fewer batches than processes), and no question is repeated to even out
    the processes' shares (Lightning's default sampler would repeat some, which would count
    them twice in the metrics).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int = 1, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(examples, num_replicas=num_replicas, rank=rank, shuffle=False)
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if len(batches) >= num_replicas:
            self.order = [i for batch in batches[rank::num_replicas] for i in batch]
        else:  # fewer batches than processes: share the questions one by one
            self.order = order[rank::num_replicas]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


# ------------------------------------------------------------------------ DataModule


class PubMedQADataModule(L.LightningDataModule):
    """PubMedQA for LoRA fine-tuning: reads, splits and tokenizes; batches padded per batch
    (evaluation batches longest first, see `LongestFirst`).

    Args:
        source: `qiaojin/PubMedQA` (hub), a local `ori_pqal.json` / hub-schema `.json` or
            `.jsonl`, or `synthetic` (the embedded demo set). Dev and test always come from it.
        hub_config: Hub configuration of `source` when it is a hub id.
        train_source: Train on this instead of the nine training folds (e.g. PQA-A:
            `qiaojin/PubMedQA` with `train_hub_config: pqa_artificial`, or `ori_pqaa.json`).
        train_hub_config: Hub configuration of `train_source`.
        fold: Which of the 10 official cross-validation folds is the dev set (0-9).
        target: What the model learns to write: the decision word alone, or the long
            answer followed by the decision.
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
        packing: Join each training batch's examples into one row without padding, attention
            kept inside each example (same loss as the padded batch, less work).
        drop_eval_overlap: Leave out of `train_source` its questions that are also dev or test
            questions (same id or same question text), saying how many. Without it such a
            source is refused: training on test questions inflates every score.
    """

    def __init__(
        self,
        source: str = HUB_DATASET,
        hub_config: str = "pqa_labeled",
        train_source: str | None = None,
        train_hub_config: str = "pqa_artificial",
        fold: int = 0,
        target: Target = "decision",
        pretrained: str = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
        max_length: int = 1024,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        predict_split: PredictSplit = "test",
        num_workers: int = 0,
        shuffle_seed: int = 0,
        bucket_batches: int = 16,
        packing: bool = False,
        drop_eval_overlap: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= fold < 10:
            raise DataError(f"--data.fold must be in 0..9, got {fold}")
        for name, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                   ("max_length", max_length, 32), ("num_workers", num_workers, 0)):
            if value < least:
                raise DataError(f"--data.{name} must be {least} or more, got {value}")
        self.save_hyperparameters()
        self.source, self.hub_config = source, hub_config
        self.train_source, self.train_hub_config = train_source, train_hub_config
        self.fold, self.target, self.pretrained, self.max_length = fold, target, pretrained, max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.predict_split, self.num_workers, self.shuffle_seed = predict_split, num_workers, shuffle_seed
        if bucket_batches < 0:
            raise DataError(f"--data.bucket_batches must be 0 (off) or more, got {bucket_batches}")
        self.bucket_batches, self.packing, self.drop_eval_overlap = bucket_batches, packing, drop_eval_overlap
        self.format: PromptFormat | None = None
        self.examples: dict[str, list[Example]] = {}
        self.train_sampler: ResumableSampler | None = None
        self._identity: dict[str, Any] | None = None
        self.consumed = 0  # training batches used in the current epoch
        self._consumed_epoch = 0

    def setup(self, stage: str) -> None:
        if self.format is None:
            from medqa.backends import load_tokenizer

            self.format = PromptFormat(load_tokenizer(self.pretrained), self.target, self.max_length)
        if self.examples:
            return
        records = read_source(self.source, self.hub_config)
        splits: dict[str, list[Record]] = dict(official_split(records, self.fold))
        origin = {name: self.source for name in splits}
        if self.train_source is not None:
            splits["train"] = self._without_eval_questions(read_source(self.train_source, self.train_hub_config),
                                                           splits["dev"] + splits["test"])
            origin["train"] = self.train_source
        splits["all"] = records
        rank_zero_info(f"Read {len(records)} records from {self.source} (fold {self.fold} is dev).")
        for name, recs in splits.items():
            self.examples[name] = [self.format.encode(r) for r in recs]
            cut = sum(e.truncated for e in self.examples[name])
            counts = ", ".join(f"{w} {n}" for w, n in label_counts(recs).items())
            if name != "all":
                rank_zero_info(
                    f"  {name}: {len(recs)} records from {origin[name]} ({counts}); "
                    f"{len(recs)} used, {cut} with the abstract cut to fit {self.max_length} tokens"
                )

    def _without_eval_questions(self, train: list[Record], held_out: list[Record]) -> list[Record]:
        """`train` with no dev or test question in it: refused, or left out when asked to."""
        def question(r: Record) -> str:
            return " ".join(r.question.split()).lower()

        ids, questions = {r.id for r in held_out}, {question(r) for r in held_out}
        leaked = [r for r in train if r.id in ids or question(r) in questions]
        if not leaked:
            return train
        if not self.drop_eval_overlap:
            raise DataError(
                f"--data.train_source {self.train_source}: {len(leaked)} of its {len(train)} questions are dev or "
                f"test questions of {self.source} (same id or question; e.g. {', '.join(r.id for r in leaked[:5])}). "
                "Training on them would inflate every score: remove them from the file, or pass "
                "--data.drop_eval_overlap true to leave them out"
            )
        rank_zero_info(f"Left out {len(leaked)} questions of {self.train_source} that are dev or test questions "
                       f"(--data.drop_eval_overlap).")
        return [r for r in train if not (r.id in ids or question(r) in questions)]

    @property
    def pad_id(self) -> int:
        tok = self.format.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def label_token_ids(self) -> list[list[int]]:
        return self.format.label_token_ids()

    def rationale_suffix_ids(self) -> list[int]:
        return self.format.rationale_suffix_ids()

    def longest_batch_tokens(self) -> int:
        """Token positions of the largest training batch the data can produce: a full batch of
        its longest examples (padded or packed, the same bound). 0 before `setup("fit")`."""
        train = self.examples.get("train") or []
        longest = sorted((len(e.input_ids) for e in train), reverse=True)[: self.batch_size]
        return sum(longest) if self.packing else len(longest) * (longest[0] if longest else 0)

    def decode(self, ids: list[int]) -> str:
        return self.format.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _processes(self) -> tuple[int, int]:
        """(number of processes, this one's rank): the samplers split the data themselves."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str, batch_size: int, sampler: Sampler[int] | None = None) -> DataLoader:
        examples = self.examples[split]
        world, rank = self._processes()
        return DataLoader(
            examples,
            batch_size=batch_size,
            sampler=sampler or LongestFirst(examples, batch_size, world, rank),
            collate_fn=partial(collate, pad_id=self.pad_id, pack=self.packing and split == "train"),
            num_workers=self.num_workers,
        )

    def _resumable_sampler(self) -> ResumableSampler:
        """The one training sampler, made on first use (by the loader or by a resume)."""
        if self.train_sampler is None:
            train = self.examples["train"]
            world, rank = self._processes()
            self.train_sampler = ResumableSampler(len(train), self.shuffle_seed, [len(e.input_ids) for e in train],
                                                  self.batch_size, self.bucket_batches, world, rank)
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
        # Called for each batch as a step takes it (not when Lightning prefetches it), so
        # `consumed` is exactly the position a resumed run must continue from.
        if self.trainer is not None and self.trainer.training:
            sampler = self.train_sampler
            epoch = sampler.epoch if sampler is not None else 0
            if epoch != self._consumed_epoch:
                self._consumed_epoch, self.consumed = epoch, 0
            self.consumed += 1
        return batch

    def identity(self) -> dict[str, Any]:
        """What a resumed fit must train on again: the settings that shape the examples, and
        digests of the tokenized training examples and of the dev questions (another file,
        fold, tokenizer, prompt or max_length changes them)."""
        if self._identity is None:
            train = hashlib.sha256()
            for e in self.examples["train"]:
                train.update(f"{e.id}|{e.answer_pos}|{e.label}|".encode())
                train.update(array("q", e.input_ids).tobytes())
            dev = hashlib.sha256("\n".join(e.id for e in self.examples["dev"]).encode())
            self._identity = {"source": self.source, "train_source": self.train_source, "fold": self.fold,
                              "target": self.target, "max_length": self.max_length,
                              "train_sha256": train.hexdigest(), "dev_sha256": dev.hexdigest()}
        return self._identity

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"target": self.target, "max_length": self.max_length}
        if self.examples:
            state["identity"] = self.identity()
        if self.train_sampler is not None and self.trainer is not None and self.trainer.state.fn == "fit":
            epoch, consumed = self.train_sampler.epoch, self.consumed
            if consumed >= self.trainer.num_training_batches:  # the epoch is over
                epoch, consumed = epoch + 1, 0
            state["train_position"] = {"epoch": epoch, "batches": consumed, "seed": self.shuffle_seed,
                                       "batch_size": self.batch_size, "size": len(self.examples["train"]),
                                       "bucket_batches": self.bucket_batches,
                                       "processes": self.train_sampler.num_replicas}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("target", self.target) != self.target:
            raise DataError(
                f"the checkpoint was trained with --data.target {state['target']!r}, this run uses "
                f"{self.target!r}; pass --data.target {state['target']} so the prompt matches"
            )
        position = state.get("train_position")
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        if fitting and "identity" in state and "train" in self.examples:
            self._check_identity(state["identity"])
        if position is not None and fitting and "train" in self.examples:
            ours = {"seed": self.shuffle_seed, "batch_size": self.batch_size, "size": len(self.examples["train"]),
                    "bucket_batches": self.bucket_batches}
            differs = [f"{k}: checkpoint {position[k]}, this run {v}" for k, v in ours.items() if position.get(k, v) != v]
            if differs:
                raise DataError(
                    "cannot resume the training order: the checkpoint's training data differs ("
                    + "; ".join(differs) + "); resume with the same --data settings"
                )
            sampler = self._resumable_sampler()
            # The position counts each process's batches; the order is one for all processes.
            done = position["batches"] * self.batch_size * position.get("processes", 1)
            sampler.epoch, sampler.skip = position["epoch"], done
            self._consumed_epoch, self.consumed = position["epoch"], position["batches"]

    def _check_identity(self, theirs: dict[str, Any]) -> None:
        """Refuse to resume a fit on other data, naming what differs."""
        ours = self.identity()
        named = [f"{k}: checkpoint {theirs[k]!r}, this run {ours[k]!r}" for k in ("fold", "target", "max_length")
                 if k in theirs and theirs[k] != ours[k]]
        digests = [k for k in ("train_sha256", "dev_sha256") if k in theirs and theirs[k] != ours[k]]
        if not named and not digests:
            return
        sources = [f"{k}: checkpoint {theirs.get(k)!r}, this run {ours[k]!r}" for k in ("source", "train_source")
                   if theirs.get(k) != ours[k]]
        what = {"train_sha256": "the tokenized training examples", "dev_sha256": "the dev questions"}
        raise DataError(
            "cannot resume: the checkpoint was trained on other data ("
            + "; ".join(named + [f"{what[k]} differ" for k in digests] + sources)
            + "). Resume with the run's own --data settings and tokenizer, or start a new run"
        )


def label_counts(records: Iterable[Record]) -> dict[str, int]:
    """How many records carry each decision."""
    return {w: sum(r.decision == w for r in records) for w in LABELS}
