"""MedQA-USMLE, 4 options: multiple-choice questions from the US medical licensing exams
(Jin et al., 2021), answered with the letter of the best option and scored over the four
letters. Read from the published JSON Lines (`data_clean/questions/US/4_options/`:
`phrases_no_exclude_{train,dev,test}.jsonl`, one object a line with `question`, `options`
{A..D: text}, `answer_idx` and `answer`), the hub copy, or the synthetic demo set.

A question's id is its split and line in the published files (`test-17` is the 17th line
of `phrases_no_exclude_test.jsonl` or `test.jsonl`), and its file's name and line in any
other file (`mycorpus_dev-17`), so a file of one's own never shares ids with the official
sets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa.records import DataError, json_lines, read_text, require_field, require_text
from medqa.tasks.task import Task

LABELS: tuple[str, ...] = ("A", "B", "C", "D")
HUB_DATASET = "GBaker/MedQA-USMLE-4-options"
SPLITS = ("train", "dev", "test")
SYSTEM_PROMPT = ("You are a medical expert. You answer multiple-choice questions from the United States "
                 "Medical Licensing Examination with the letter of the best option.")
INSTRUCTION = "Answer with the letter of the best option: A, B, C or D."


@dataclass(frozen=True)
class Record:
    """One question: its vignette, its four options and the correct letter."""

    id: str
    question: str
    options: dict[str, str]
    answer_idx: str
    split: str | None = None  # from the file it came from
    long_answer: str = ""  # the published set has no explanations

    @property
    def label(self) -> int:
        return LABELS.index(self.answer_idx)


def make_record(raw: Any, rid: str, split: str | None, where: str) -> Record:
    """Check one published-schema object and build its record."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with question, options, answer_idx, got {type(raw).__name__}")
    question, options, letter = (require_field(raw, k, where) for k in ("question", "options", "answer_idx"))
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty question, got {question!r}")
    if not isinstance(options, dict) or sorted(options) != list(LABELS) or not all(
            isinstance(v, str) and v.strip() for v in options.values()):
        shown = sorted(options) if isinstance(options, dict) else type(options).__name__
        raise DataError(f"{where}: field 'options' must map A, B, C and D to option texts, got {shown}")
    if letter not in LABELS:
        raise DataError(f"{where}: field 'answer_idx' must be one of A/B/C/D, got {letter!r}")
    if "answer" in raw and raw["answer"] != options[letter]:
        raise DataError(f"{where}: field 'answer' {raw['answer']!r} is not option {letter} "
                        f"({options[letter]!r}); the record contradicts itself")
    for value, key in [(question, "question"), *((v, f"options.{k}") for k, v in options.items())]:
        require_text(value, key, where)
    return Record(rid, question.strip(), {k: options[k].strip() for k in LABELS}, letter, split)


def split_of(path: Path) -> str | None:
    """`train`, `dev` or `test` from a published file's name (`..._dev.jsonl`), else None."""
    stem = path.stem.lower()
    return next((s for s in SPLITS if stem == s or stem.endswith(("_" + s, "-" + s))), None)


def read_file(path: Path) -> list[Record]:
    """One published JSON Lines file, in file order."""
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: expected a .jsonl file of MedQA-USMLE questions (one JSON object a line)")
    split = split_of(path)
    published = split is not None and path.stem.lower() in (split, f"phrases_no_exclude_{split}")
    records = [make_record(raw, f"{split if published else path.stem}-{n}", split, where)
               for n, raw, where in json_lines(read_text(path), path)]
    if not records:
        raise DataError(f"{path}: holds no questions")
    return records


def read_folder(folder: Path) -> list[Record]:
    """The published folder: one `*train.jsonl`, one `*dev.jsonl` and one `*test.jsonl`."""
    found = {s: [p for p in sorted(folder.glob("*.jsonl")) if split_of(p) == s] for s in SPLITS}
    wrong = {s: [p.name for p in ps] for s, ps in found.items() if len(ps) != 1}
    if wrong:
        raise DataError(f"{folder}: expected exactly one .jsonl file per split named ..._train, ..._dev and "
                        f"..._test (as in data_clean/questions/US/4_options/); found {wrong}")
    return [r for s in SPLITS for r in read_file(found[s][0])]


def read_hub(dataset_id: str, config: str | None) -> list[Record]:
    """The hub copy: its train and test splits; without a dev split there, the dev set is
    1,272 training questions (the published dev set's size) chosen with a fixed seed."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config)
    except Exception as e:  # datasets raises many types for "not reachable / not cached"
        raise DataError(f"hub dataset {dataset_id!r} could not be loaded: {type(e).__name__}: {e}\nWithout network "
                        "access, point --data.source at the folder of the published .jsonl files") from None
    names = {"train": "train", "dev": "validation" if "validation" in ds else "dev", "test": "test"}
    records = [make_record(dict(row), f"{split}-{i + 1}", split, f"hub {dataset_id}/{name}: row {i}")
               for split, name in names.items() if name in ds for i, row in enumerate(ds[name])]
    if not any(r.split == "dev" for r in records):
        train = [r for r in records if r.split == "train"]
        dev = {r.id for r in random.Random(0).sample(train, min(1272, len(train) // 10))}
        records = [Record(r.id, r.question, r.options, r.answer_idx, "dev" if r.id in dev else r.split) for r in records]
    return records


def read_source(source: str, hub_config: str | None = None) -> list[Record]:
    """Records from `source`: 'synthetic', the published folder, one of its files, or a hub id."""
    if source == "synthetic":
        return synthetic_records()
    path = Path(source).expanduser()
    if path.is_dir():
        return read_folder(path)
    if path.exists() or path.suffix == ".jsonl" or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataError(f"{path}: no such file or folder (expected the folder of MedQA-USMLE's .jsonl files)")
        return read_file(path)
    return read_hub(source, hub_config)


def official_split(records: Sequence[Record], fold: int = 0) -> dict[str, list[Record]]:
    """The published train / dev / test split, as the files give it."""
    untagged = [r.id for r in records if r.split not in SPLITS]
    if untagged:
        raise DataError(f"{len(untagged)} questions come from a file whose name names no split (e.g. {untagged[0]}); "
                        "point --data.source at the folder with the _train, _dev and _test files")
    return {s: [r for r in records if r.split == s] for s in SPLITS}


def user_turn(record: Record, passage: str, instruction: str) -> str:
    """The vignette and its question, the options, then the instruction (nothing is cut)."""
    options = "\n".join(f"{k}. {v}" for k, v in record.options.items())
    return f"Question: {record.question}\n\nOptions:\n{options}\n{instruction}"


# ------------------------------------------------------------------ the synthetic demo set

_OPTIONS = {"A": "Start antibiotics", "B": "Start anticoagulation", "C": "Start insulin", "D": "Refer for surgery"}
_FINDINGS = {
    "A": ["fever and a productive cough", "burning on urination and fever", "a hot, spreading red rash"],
    "B": ["a swollen, painful calf", "sudden breathlessness after a long flight", "a new irregular pulse and weakness"],
    "C": ["extreme thirst and weight loss", "a blood glucose of 28 mmol/L", "deep sighing breaths and ketones"],
    "D": ["a rigid abdomen and free air under the diaphragm", "a tender, irreducible groin lump", "a perforated appendix"],
}
_PLACES = ["the emergency department", "her family doctor", "a rural clinic", "the outpatient clinic"]


def synthetic_records(n: int = 600, seed: int = 0) -> list[Record]:
    """`n` MedQA-shaped questions: 2/3 train, 1/6 dev, 1/6 test. The options come in one
    fixed order, so the letter follows from the finding in the vignette: the set checks the
    pipeline (a model that reads the question can answer), not medical reasoning."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        letter = rng.choice(LABELS)
        age, place = rng.randint(18, 90), rng.choice(_PLACES)
        finding = rng.choice(_FINDINGS[letter])
        question = (f"A patient aged {age} presents to {place} with {finding}. Vital signs are recorded. Which of "
                    f"the following is the most appropriate next step for a patient with {finding}?")
        split = "train" if i < n * 2 // 3 else "dev" if i < n * 5 // 6 else "test"
        records.append(Record(f"{split}-{i + 1}", question, dict(_OPTIONS), letter, split))
    return records


TASK = Task(
    name="medqa_usmle",
    labels=LABELS,
    system_prompt=SYSTEM_PROMPT,
    instruction=INSTRUCTION,
    default_source=HUB_DATASET,
    default_hub_config=None,
    folds=1,
    read=read_source,
    split=official_split,
    passage=lambda record: "",
    user_turn=user_turn,
)
