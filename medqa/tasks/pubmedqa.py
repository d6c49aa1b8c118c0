"""PubMedQA: the label words and prompt text, the record shape, the readers (the hub,
`ori_pqal.json`, hub-schema JSON and JSON Lines), the official split (PQA-L's 500 test
questions and ten cross-validation folds) and the synthetic demo set that
`--data.source synthetic` reads."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medqa.records import (DataError, NotAnObject, json_lines, object_items, parse_json, read_text, record_id,
                           require_field, require_str_list, require_text)
from medqa.tasks.task import Task


HUB_DATASET = "qiaojin/PubMedQA"

LABELS: tuple[str, ...] = ("yes", "no", "maybe")
"""The PubMedQA decisions, in class-index order."""

SYSTEM_PROMPT = (
    "You are a biomedical research assistant. You read the abstract of a PubMed article "
    "and answer the research question about it with yes, no or maybe."
)
INSTRUCTION = "Answer with yes, no or maybe."


SYNTHETIC = "synthetic"
"""`--data.source synthetic`: the embedded demo set (`synthetic_records` below)."""


Split = Literal["train", "dev", "test"]


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
    contexts = require_str_list(contexts, c_name, where)
    context_labels = require_str_list(context_labels, l_name, where) if context_labels is not None else []
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
        require_text(value, key, where)
    return Record(rid, question.strip(), contexts, context_labels, long_answer, decision)


def _from_original(pmid: str, raw: Any, where: str) -> Record:
    """The PubMedQA repository's schema: `{PMID: {QUESTION, CONTEXTS, LABELS, ...}}`."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with QUESTION, CONTEXTS, ..., got {type(raw).__name__}")
    return make_record(
        pmid,
        require_field(raw, "QUESTION", where),
        require_field(raw, "CONTEXTS", where),
        raw.get("LABELS"),
        require_field(raw, "LONG_ANSWER", where),
        require_field(raw, "final_decision", where),
        where,
        ("QUESTION", "CONTEXTS", "LABELS", "LONG_ANSWER", "final_decision"),
        "PMID",
    )


def _from_hub(raw: Any, where: str) -> Record:
    """The hub's schema: `{pubid, question, context: {contexts, labels}, long_answer, final_decision}`."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with pubid, question, context, ..., got {type(raw).__name__}")
    context = require_field(raw, "context", where)
    if not isinstance(context, dict):
        raise DataError(f"{where}: field 'context' must be an object with 'contexts' and 'labels', got {type(context).__name__}")
    return make_record(
        require_field(raw, "pubid", where),
        require_field(raw, "question", where),
        require_field(context, "contexts", f"{where}, field 'context'"),
        context.get("labels"),
        require_field(raw, "long_answer", where),
        require_field(raw, "final_decision", where),
        where,
        ("question", "context.contexts", "context.labels", "long_answer", "final_decision"),
    )


def _unique(records: Iterable[Record], origin: str) -> Iterator[Record]:
    """`records`, refusing an id seen before."""
    seen: set[str] = set()
    for i, r in enumerate(records):
        if r.id in seen:
            raise DataError(f"{origin}: record {i}: id {r.id!r} appears more than once; ids must be unique")
        seen.add(r.id)
        yield r


def read_file(path: str | Path) -> list[Record]:
    """Read PubMedQA records from a local file, in file order.

    Accepted: the original `ori_pqal.json` / `ori_pqaa.json` (one object keyed by PMID),
    a JSON list of records in the hub's schema, or JSON Lines in the hub's schema.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected ori_pqal.json, a hub-schema .json or .jsonl)")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")

    if path.suffix == ".jsonl":
        return list(_unique((_from_hub(raw, where) for _, raw, where in json_lines(text, path)), str(path)))

    data = parse_json(text, str(path))
    if isinstance(data, dict):
        # The official split needs file order, which dicts keep.
        return [_from_original(pmid, raw, f"{path}: record {pmid!r}") for pmid, raw in data.items()]
    if isinstance(data, list):
        return list(_unique((_from_hub(raw, f"{path}: record {i}") for i, raw in enumerate(data)), str(path)))
    raise DataError(
        f"{path}: top level is a {type(data).__name__}; expected an object keyed by PMID "
        "(ori_pqal.json) or a list of hub-schema records"
    )


def stream_file(path: str | Path) -> Iterator[Record]:
    """`read_file`'s records one at a time, in file order, without the whole file in memory:
    the original schema (`ori_pqaa.json`) and JSON Lines are read a piece at a time, a JSON
    list whole."""
    path = Path(path)
    if not path.is_file():
        yield from read_file(path)  # its error
        return
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", newline="\n") as lines:
            try:
                yield from _unique((_from_hub(raw, where) for _, raw, where in json_lines(lines, path)), str(path))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e})") from None
        return
    items = object_items(path)
    try:
        first = list(islice(items, 1))
    except NotAnObject as top:
        if not str(top):
            raise DataError(f"{path}: the file is empty") from None
        yield from read_file(path)  # a list of hub-schema records, or its error
        return
    for pmid, raw in chain(first, items):
        yield _from_original(pmid, raw, f"{path}: record {pmid!r}")


def read_hub(dataset_id: str, config: str) -> list[Record]:
    """Read a PubMedQA configuration from the Hugging Face hub (or its local cache)."""
    import datasets

    from medqa.hub import offline_unless_reachable

    offline_unless_reachable()
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
    return list(_unique(records, f"hub {dataset_id}/{config}"))


def read_source(source: str, hub_config: str) -> list[Record]:
    """Records from `source`: 'synthetic', a local file, or a hub dataset id."""
    if source == SYNTHETIC:
        return synthetic_records()
    path = Path(source).expanduser()
    if path.exists() or path.suffix in (".json", ".jsonl") or source.startswith((".", "/", "~")):
        return read_file(path)
    return read_hub(source, hub_config)


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


def passage(record: Record) -> str:
    """The abstract's sections, one paragraph each, led by their section names."""
    parts = []
    for i, text in enumerate(record.contexts):
        label = record.context_labels[i] if i < len(record.context_labels) else ""
        parts.append(f"{label}: {text}" if label else text)
    return "\n".join(parts)


def user_turn(record: Record, abstract: str, instruction: str) -> str:
    """The user's message: the abstract, then the question, then the instruction."""
    return f"Abstract:\n{abstract}\n\nQuestion: {record.question}\n{instruction}"


# ------------------------------------------------------------------ the synthetic demo set


_DRUGS = ["metformin", "aspirin", "statin therapy", "vitamin D", "early mobilisation", "laparoscopy",
          "beta blockers", "home visits", "acupuncture", "omega-3 supplements", "antibiotic prophylaxis",
          "cognitive therapy", "tranexamic acid", "low-dose steroids", "telemonitoring"]


_OUTCOMES = ["mortality", "length of stay", "pain scores", "readmission", "wound infection",
             "blood pressure", "quality of life", "recurrence", "functional recovery", "glucose control"]


_GROUPS = ["elderly patients", "children", "pregnant women", "patients with diabetes",
           "smokers", "patients after surgery", "outpatients", "patients with heart failure"]


_FINDINGS = {
    "yes": ["better", "improved", "superior"],
    "no": ["unchanged", "worse", "similar"],
    "maybe": ["inconclusive", "mixed", "uncertain"],
}


_CONCLUSIONS = {
    "yes": "{drug} improves {outcome} in {group}.",
    "no": "{drug} does not improve {outcome} in {group}.",
    "maybe": "The effect of {drug} on {outcome} in {group} remains uncertain.",
}


def synthetic_records(n: int = 1000, seed: int = 0):
    """`n` PubMedQA-shaped records, yes 45%, no 35%, maybe 20% (PQA-L has 55/34/11; more maybes let a tiny model learn them).

    Each abstract states its finding in the RESULTS section, so a model that reads the
    context can answer; the size matches PQA-L so the official split gives 500/450/50.
    """
    rng = random.Random(seed)
    records = []
    for i in range(n):
        decision = rng.choices(LABELS, weights=(45, 35, 20))[0]
        drug, outcome, group = rng.choice(_DRUGS), rng.choice(_OUTCOMES), rng.choice(_GROUPS)
        size = rng.randint(40, 900)
        contexts = [
            f"The effect of {drug} on {outcome} in {group} is debated.",
            f"We studied {size} {group} in a randomised trial of {drug}.",
            f"Compared with usual care, {outcome} was {rng.choice(_FINDINGS[decision])} with {drug}.",
            f"Overall, the effect on {outcome} was {rng.choice(_FINDINGS[decision])}.",
        ]
        records.append(
            Record(
                id=str(10_000_000 + i),
                question=f"Does {drug} improve {outcome} in {group}?",
                contexts=contexts,
                context_labels=["BACKGROUND", "METHODS", "RESULTS", "RESULTS"],
                long_answer=_CONCLUSIONS[decision].format(drug=drug, outcome=outcome, group=group).capitalize(),
                decision=decision,
            )
        )
    return records


TASK = Task(
    name="pubmedqa",
    labels=LABELS,
    system_prompt=SYSTEM_PROMPT,
    instruction=INSTRUCTION,
    default_source=HUB_DATASET,
    default_hub_config="pqa_labeled",
    folds=10,
    read=lambda source, hub_config: read_source(source, hub_config or "pqa_labeled"),
    split=official_split,
    passage=passage,
    user_turn=user_turn,
    stream=lambda source, _: stream_file(Path(source).expanduser()),
)
