import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from medqa.tokens import PromptFormat, collate
from medqa.records import DataError
from medqa.tasks.pubmedqa import Record, official_split, read_file, read_source
from medqa.tasks.pubmedqa import synthetic_records
from medqa.tasks.pubmedqa import LABELS


def as_original(records: list[Record]) -> dict:
    return {
        r.id: {"QUESTION": r.question, "CONTEXTS": r.contexts, "LABELS": r.context_labels, "MESHES": [],
               "YEAR": "2001", "LONG_ANSWER": r.long_answer, "final_decision": r.decision}
        for r in records
    }


def as_hub(r: Record) -> dict:
    return {"pubid": int(r.id), "question": r.question,
            "context": {"contexts": r.contexts, "labels": r.context_labels, "meshes": []},
            "long_answer": r.long_answer, "final_decision": r.decision}


# ---------------------------------------------------------------- both file schemas


def test_original_hub_json_and_jsonl_read_the_same(tmp_path):
    records = synthetic_records(30)
    (tmp_path / "ori.json").write_text(json.dumps(as_original(records)))
    (tmp_path / "hub.json").write_text(json.dumps([as_hub(r) for r in records]))
    (tmp_path / "hub.jsonl").write_text("\n".join(json.dumps(as_hub(r)) for r in records) + "\n")
    for name in ("ori.json", "hub.json", "hub.jsonl"):
        assert read_file(tmp_path / name) == records, name


def test_real_pqal_file(pubmedqa_dir):
    records = read_file(pubmedqa_dir / "ori_pqal.json")
    assert len(records) == 1000
    assert Counter(r.decision for r in records) == {"yes": 552, "no": 338, "maybe": 110}
    first = records[0]
    assert first.id == "21645374" and first.question.startswith("Do mitochondria play a role")
    assert len(first.contexts) == len(first.context_labels) > 0


# ---------------------------------------------------------------- the official split


def test_official_test_set_is_the_500_official_pmids(pubmedqa_dir):
    records = read_file(pubmedqa_dir / "ori_pqal.json")
    truth = json.loads((pubmedqa_dir / "test_ground_truth.json").read_text())
    split = official_split(records, fold=0)
    assert {r.id: r.decision for r in split["test"]} == truth


@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_folds_partition_the_cv_pool(source, request):
    if source == "real":
        records = read_file(request.getfixturevalue("pubmedqa_dir") / "ori_pqal.json")
    else:
        records = synthetic_records()
    splits = [official_split(records, fold=k) for k in range(10)]
    test_ids = {r.id for r in splits[0]["test"]}
    devs = [{r.id for r in s["dev"]} for s in splits]
    pool = set().union(*devs)
    assert len(test_ids) == 500 and not pool & test_ids and len(pool) == 500
    assert all(len(d) == 50 for d in devs) and sum(map(len, devs)) == 500  # disjoint
    for k, s in enumerate(splits):
        assert {r.id for r in s["train"]} == pool - devs[k]
        assert {r.id for r in s["test"]} == test_ids


def test_too_few_records_for_the_split():
    with pytest.raises(DataError, match="too few for PubMedQA's 10-way split"):
        official_split(synthetic_records(12))


def test_fold_out_of_range():
    with pytest.raises(DataError, match="0..9"):
        official_split(synthetic_records(), fold=10)


# ---------------------------------------------------------------- tokenization


def test_labels_mask_everything_but_the_answer(tokenizer):
    fmt = PromptFormat(tokenizer, "decision", 512)
    record = synthetic_records(5)[2]
    ex = fmt.encode(record)
    word = fmt.label_token_ids()[record.label]
    answer = ex.input_ids[ex.answer_pos :]
    assert answer == word + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    assert ex.labels[: ex.answer_pos] == [-100] * ex.answer_pos
    assert ex.labels[ex.answer_pos :] == answer
    prompt = tokenizer.decode(ex.input_ids[: ex.answer_pos])
    assert record.question in prompt and record.contexts[-1] in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_too_long_cuts_the_abstract_never_question_or_answer(tokenizer):
    record = synthetic_records(1)[0]
    long = Record(record.id, record.question, record.contexts * 60, record.context_labels * 60,
                  record.long_answer, record.decision)
    full = PromptFormat(tokenizer, "decision", 100_000).encode(long)
    cut = PromptFormat(tokenizer, "decision", 200).encode(long)
    assert not full.truncated and cut.truncated
    assert len(cut.input_ids) == 200 < len(full.input_ids)
    # Same answer, same question tail; only the abstract in the middle is shorter.
    tail = len(full.input_ids) - full.answer_pos
    assert cut.input_ids[-tail:] == full.input_ids[-tail:]
    assert cut.labels[-tail:] == full.labels[-tail:] and cut.answer_pos == 200 - tail
    q_tail = 30
    assert cut.input_ids[cut.answer_pos - q_tail : cut.answer_pos] == full.input_ids[full.answer_pos - q_tail : full.answer_pos]
    assert record.question in tokenizer.decode(cut.input_ids)


def test_question_too_long_for_max_length_is_an_error(tokenizer):
    with pytest.raises(DataError, match=r"record '10000000'.*max_length 40"):
        PromptFormat(tokenizer, "decision", 40).encode(synthetic_records(1)[0])


def test_plain_prompt_without_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    fmt = PromptFormat(plain, "decision", 512)
    record = synthetic_records(1)[0]
    ex = fmt.encode(record)
    text = plain.decode(ex.input_ids)
    assert not fmt.chat and "<|start_header_id|>" not in text
    assert text.endswith(f"Answer: {record.decision}<|eot_id|>")
    assert ex.input_ids[ex.answer_pos : ex.answer_pos + len(fmt.label_token_ids()[record.label])] == fmt.label_token_ids()[record.label]


def test_long_answer_target_scores_after_the_long_answer(tokenizer):
    fmt = PromptFormat(tokenizer, "long_answer", 512)
    record = synthetic_records(1)[0]
    ex = fmt.encode(record)
    first_answer = ex.labels.index(next(t for t in ex.labels if t != -100))
    head = tokenizer.decode(ex.input_ids[first_answer : ex.answer_pos])
    assert record.long_answer in head and head.endswith("Answer:")
    word = fmt.label_token_ids()[record.label]
    assert ex.input_ids[ex.answer_pos : ex.answer_pos + len(word)] == word


def test_collate_pads_to_the_longest_in_the_batch(tokenizer):
    fmt = PromptFormat(tokenizer, "decision", 512)
    examples = [fmt.encode(r) for r in synthetic_records(4)]
    batch = collate(examples, pad_id=7)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (4, width)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["attention_mask"][i].sum() == n
        assert (batch["input_ids"][i, n:] == 7).all() and (batch["labels"][i, n:] == -100).all()
    assert torch.equal(batch["label"], torch.tensor([e.label for e in examples]))
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())
    # The loss positions are exactly those whose next token carries a label.
    flat = batch["labels"].flatten()
    assert torch.equal(flat[batch["loss_pos"] + 1], batch["loss_targets"])
    assert len(batch["loss_pos"]) == int((batch["labels"] != -100).sum())


# ---------------------------------------------------------------- bad input


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def good_original() -> dict:
    return as_original(synthetic_records(3))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.json", "", r"empty\.json: the file is empty"),
        ("truncated.json", '{"1": {"QUESTION": "x"', r"truncated\.json: not valid JSON"),
        ("number.json", "42", r"number\.json: top level is a int; expected an object keyed by PMID"),
        ("latin1.json", b'{"1": "\xe9"}', r"latin1\.json: not UTF-8"),
        ("bad.jsonl", '{"pubid": 1}\nnot json\n', r"bad\.jsonl: line 1: missing field 'context'"),
        ("brokenline.jsonl", json.dumps(as_hub(synthetic_records(1)[0])) + "\n{oops\n", r"brokenline\.jsonl: line 2: not valid JSON"),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        read_file(write(tmp_path, name, content))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        read_source(str(tmp_path / "nope.json"), "pqa_labeled")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("final_decision", "perhaps", r"record '10000001': field 'final_decision' must be one of yes/no/maybe, got 'perhaps'"),
        ("QUESTION", "   ", r"record '10000001': field 'QUESTION' must be a non-empty question"),
        ("CONTEXTS", "a string", r"record '10000001': field 'CONTEXTS' must be a list of strings, got str"),
        ("LONG_ANSWER", 3, r"record '10000001': field 'LONG_ANSWER' must be a string, got int"),
        ("final_decision", None, r"record '10000001': missing field 'final_decision'"),
        ("final_decision", 1, r"record '10000001': field 'final_decision' must be one of yes/no/maybe, got 1"),
        ("QUESTION", ["a list"], r"record '10000001': field 'QUESTION' must be a non-empty question"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, field, value, message):
    data = good_original()
    if value is None:
        del data["10000001"][field]
    else:
        data["10000001"][field] = value
    path = write(tmp_path, "pqal.json", json.dumps(data))
    with pytest.raises(DataError, match=r"pqal\.json: " + message):
        read_file(path)


def test_hub_schema_wrong_types(tmp_path):
    record = as_hub(synthetic_records(1)[0])
    record["context"]["contexts"] = "one string"
    path = write(tmp_path, "bad.jsonl", json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1: field 'context.contexts' must be a list of strings, got str"):
        read_file(path)
    record["context"] = "abstract"
    path = write(tmp_path, "bad.json", json.dumps([record]))
    with pytest.raises(DataError, match=r"bad\.json: record 0: field 'context' must be an object"):
        read_file(path)


def test_duplicate_ids_are_refused(tmp_path):
    record = as_hub(synthetic_records(1)[0])
    path = write(tmp_path, "dup.jsonl", json.dumps(record) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"dup\.jsonl: record 1: id '10000000' appears more than once"):
        read_file(path)
    entry = json.dumps(good_original()["10000000"])
    path = write(tmp_path, "dup.json", '{"5": %s, "5": %s}' % (entry, entry))
    with pytest.raises(DataError, match=r"dup\.json: key '5' appears more than once"):
        read_file(path)


def test_hub_unreachable_says_how_to_work_offline():
    with pytest.raises(DataError) as e:
        read_source("no-such-org/no-such-pubmedqa", "pqa_labeled")
    message = str(e.value)
    assert "no-such-org/no-such-pubmedqa" in message and "HF_HUB_OFFLINE" in message and "ori_pqal.json" in message


def test_every_label_word_is_scored(tokenizer):
    ids = PromptFormat(tokenizer, "decision", 512).label_token_ids()
    assert len(ids) == len(LABELS) and all(ids) and len({tuple(i) for i in ids}) == 3


@pytest.mark.parametrize("pubid, shown", [
    (None, "None"), ("", "''"), ("  ", "'  '"), ([1], r"\[1\]"), ({"a": 1}, r"\{'a': 1\}"), (True, "True"), (1.5, "1.5"),
])
def test_ids_must_be_non_empty_strings_or_integers(tmp_path, pubid, shown):
    record = as_hub(synthetic_records(1)[0])
    record["pubid"] = pubid
    path = write(tmp_path, "ids.jsonl", json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"ids\.jsonl: line 1: field 'pubid' must be a non-empty string or an integer id, got " + shown):
        read_file(path)


def test_a_json_lines_record_with_a_repeated_field_is_refused(tmp_path):
    line = json.dumps(as_hub(synthetic_records(1)[0]))
    path = write(tmp_path, "twice.jsonl", line[:-1] + ', "final_decision": "no"}\n')
    with pytest.raises(DataError, match=r"twice\.jsonl: line 1: key 'final_decision' appears more than once"):
        read_file(path)


def test_unpaired_surrogates_are_refused_naming_record_and_field(tmp_path):
    data = good_original()
    text = json.dumps(data).replace('"QUESTION": "', '"QUESTION": "\\ud800', 1)
    path = write(tmp_path, "surrogate.json", text)
    with pytest.raises(DataError, match=r"surrogate\.json: record '10000000': field 'QUESTION' holds text that is not valid Unicode"):
        read_file(path)


def test_pathological_nesting_is_a_clear_error(tmp_path):
    path = write(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json: nested too deeply"):
        read_file(path)


def test_training_sources_with_test_questions_are_refused_or_filtered(tmp_path):
    from medqa.data import QADataModule

    records = synthetic_records()
    test = official_split(records)["test"]
    # a PQA-A-like source: 300 questions of its own, plus 2 test questions (one renamed)
    own = synthetic_records(300, seed=11)
    own = [Record(f"9{r.id}", r.question + " (own)", r.contexts, r.context_labels, r.long_answer, r.decision) for r in own]
    renamed = Record("777", test[1].question, test[1].contexts, test[1].context_labels, test[1].long_answer, test[1].decision)
    path = write(tmp_path, "train.jsonl", "\n".join(json.dumps(as_hub(r)) for r in own + [test[0], renamed]) + "\n")
    dm = QADataModule(source="synthetic", train_source=str(path), pretrained="builtin:tiny-llama", max_length=512)
    with pytest.raises(DataError, match=r"train\.jsonl: 2 of its 302 questions are dev or test questions .*drop_eval_overlap"):
        dm.setup("fit")
    dm = QADataModule(source="synthetic", train_source=str(path), pretrained="builtin:tiny-llama", max_length=512,
                      drop_eval_overlap=True)
    dm.setup("fit")
    assert len(dm.examples["train"]) == 300


def test_reasoning_free_gives_the_conclusion_after_the_abstract_and_never_cuts_it(tokenizer):
    record = synthetic_records(1)[0]
    long = Record(record.id, record.question, record.contexts * 60, record.context_labels * 60,
                  record.long_answer, record.decision)
    required = PromptFormat(tokenizer, "decision", 512).encode(record)
    free = PromptFormat(tokenizer, "decision", 512, reasoning="free").encode(record)
    prompt = tokenizer.decode(free.input_ids[: free.answer_pos])
    assert record.long_answer not in tokenizer.decode(required.input_ids)
    assert f"{record.contexts[-1]}\nCONCLUSIONS: {record.long_answer}" in prompt  # after the abstract's sections
    assert prompt.index("CONCLUSIONS:") < prompt.index(record.question)
    cut = PromptFormat(tokenizer, "decision", 300, reasoning="free").encode(long)
    assert cut.truncated and f"CONCLUSIONS: {record.long_answer}" in tokenizer.decode(cut.input_ids)
    assert free.input_ids[free.answer_pos :] == required.input_ids[required.answer_pos :]  # the same answer


def test_reasoning_free_needs_a_long_answer():
    from medqa.data import QADataModule

    dm = QADataModule(task="medqa_usmle", source="synthetic", pretrained="builtin:tiny-llama", max_length=512,
                      reasoning="free")
    with pytest.raises(DataError, match=r"record 'train-\d+'.*--data.reasoning free gives the record's conclusion"):
        dm.setup("fit")


def test_a_checkpoint_of_the_other_reasoning_setting_is_refused():
    from medqa.data import QADataModule

    dm = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512)
    saved = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512,
                         reasoning="free").state_dict()
    with pytest.raises(DataError, match=r"trained with --data.reasoning 'free', this run uses 'required'"):
        dm.load_state_dict(saved)
    dm.load_state_dict({k: v for k, v in saved.items() if k != "reasoning"})  # saved before the setting: required


def test_balanced_classes_weigh_each_class_alike_in_training_batches_only():
    from medqa.data import QADataModule

    dm = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512, batch_size=8,
                      balance_classes=True)
    dm.setup("fit")
    weights = dm.class_weights()
    counts = Counter(e.label for e in dm.examples["train"])
    assert len(counts) == 3 and len(set(counts.values())) > 1  # the synthetic training split is unbalanced
    for label, n in counts.items():  # every class carries the same total weight: a third of the examples
        assert n * weights[label] == pytest.approx(len(dm.examples["train"]) / 3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["weight"].tolist() == pytest.approx([weights[x] for x in batch["label"].tolist()])
    assert "weight" not in next(iter(dm.val_dataloader()))  # dev loss stays comparable between runs
    plain = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512)
    plain.setup("fit")
    assert plain.class_weights() is None and "weight" not in next(iter(plain.train_dataloader()))
    with pytest.raises(DataError, match=r"cannot resume.*balance_classes: checkpoint True, this run False"):
        plain.load_state_dict(dm.state_dict())


@pytest.mark.parametrize("task, target, reasoning, max_length", [
    ("pubmedqa", "decision", "required", 512), ("pubmedqa", "decision", "required", 150),  # 150: passages cut
    ("pubmedqa", "long_answer", "required", 512), ("pubmedqa", "decision", "free", 512),
    ("medqa_usmle", "decision", "required", 512)])
def test_batched_tokenization_gives_exactly_the_one_by_one_examples(tokenizer, task, target, reasoning, max_length):
    from medqa.tasks import get_task

    fmt = PromptFormat(tokenizer, target, max_length, get_task(task), reasoning=reasoning)
    records = get_task(task).read("synthetic", None)[:300]
    many = list(fmt.encode_many(records, chunk=64))  # several chunks, the last one short
    assert many == [fmt.encode(r) for r in records]
    assert max_length > 200 or any(e.truncated for e in many)


def test_batched_tokenization_of_the_real_pqal_file(tokenizer, pubmedqa_dir):
    from medqa.tasks import get_task

    records = get_task("pubmedqa").read(str(pubmedqa_dir / "ori_pqal.json"), None)
    fmt = PromptFormat(tokenizer, "decision", 1024)
    assert list(fmt.encode_many(records)) == [fmt.encode(r) for r in records]


def test_batched_tokenization_refuses_the_same_record_as_one_by_one(tokenizer):
    records = synthetic_records(5)
    records[3] = Record(**{**records[3].__dict__, "question": "word " * 400})
    with pytest.raises(DataError, match=rf"record {records[3].id!r}: the prompt without its passage"):
        list(PromptFormat(tokenizer, "decision", 256).encode_many(records))
