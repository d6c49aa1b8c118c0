"""The tokenized-example cache (`medqa.cache`): the same examples as tokenizing, a hit for the
same key, a new build when any part of the key changes, damaged or foreign files rebuilt and
never used, one build for two processes."""

import json
import logging
import multiprocessing
from dataclasses import replace

import pyarrow as pa
import pytest

from medqa.cache import MANIFEST, SCHEMA, examples_sha256, file_digest
from medqa.data import QADataModule
from medqa.tasks.pubmedqa import synthetic_records
from test_data import as_original

RECORDS = 200  # the official split's procedure: 100 test, 11 dev, 89 training questions
FIELDS = ("id", "input_ids", "labels", "prompt_len", "answer_pos", "label", "truncated")


def module(tmp_path, **settings) -> QADataModule:
    settings = {"source": str(tmp_path / "ori.json"), "max_length": 384, **settings}
    dm = QADataModule(pretrained="builtin:tiny-llama", cache_dir=str(tmp_path / "cache"), **settings)
    dm.setup("fit")
    return dm


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "ori.json"
    path.write_text(json.dumps(as_original(synthetic_records(RECORDS))))
    return path


def same_as_tokenizing(dm: QADataModule) -> None:
    """Every split holds what tokenizing its records one by one gives, in order."""
    fmt, records = dm.formatter, dm.task.read(dm.source, dm.hub_config)
    splits = {**dict(dm.task.split(records, dm.fold)), "all": records}
    if dm.train_source is not None:
        splits["train"] = dm.task.read(dm.train_source, None)
    for name, recs in splits.items():
        cached = dm.examples[name]
        assert len(cached) == len(recs), name
        for example, record in zip(cached, recs):
            expected = fmt.encode(record)
            assert all(getattr(example, f) == getattr(expected, f) for f in FIELDS), (name, record.id)
        assert cached.lengths() == [len(fmt.encode(r).input_ids) for r in recs]
        assert [e.id for e in cached[1:7:2]] == [r.id for r in recs[1:7:2]] and cached[-1].id == recs[-1].id


@pytest.mark.slow
def test_examples_are_those_of_tokenizing_and_a_second_setup_maps_them(tmp_path, source, caplog):
    caplog.set_level(logging.INFO)
    first = module(tmp_path, max_length=160)  # some passages cut
    assert first.built_cache and "tokenized into" in caplog.text
    assert sum(first.examples["train"].truncated) > 0
    same_as_tokenizing(first)
    caplog.clear()
    second = module(tmp_path, max_length=160)
    assert not second.built_cache and f"tokenized, from {second.cache.folder}" in caplog.text
    assert "  train: 89 records from" in caplog.text  # the build's counts are said again
    assert second.identity() == first.identity()
    same_as_tokenizing(second)


@pytest.mark.slow
def test_real_pqal_examples_are_those_of_tokenizing(tmp_path, pubmedqa_dir):
    dm = module(tmp_path, source=str(pubmedqa_dir / "ori_pqal.json"))
    same_as_tokenizing(dm)
    assert len(dm.examples["test"]) == 500


@pytest.mark.parametrize("change", [
    {"max_length": 320}, {"target": "long_answer"}, {"reasoning": "free"}, {"system_prompt": "Answer as a clinician."},
    {"instruction": "Yes, no or maybe?"}, {"fold": 3}, {"file": "one record's abstract edited"},
    {"train_source": "a training file"}, {"tokenizer": "one token more"},
])
@pytest.mark.slow
def test_any_change_to_what_the_examples_depend_on_builds_anew(tmp_path, source, change):
    base, original = module(tmp_path), source.read_text()
    settings = {k: v for k, v in change.items() if k not in ("file", "train_source", "tokenizer")}
    if "file" in change:
        records = synthetic_records(RECORDS)
        records[7] = replace(records[7], contexts=[records[7].contexts[0] + " Edited.", *records[7].contexts[1:]])
        source.write_text(json.dumps(as_original(records)))
    if "train_source" in change:
        train = tmp_path / "train.json"
        train.write_text(json.dumps(as_original([replace(r, id=f"9{r.id}", question=r.question + " (PQA-A)")
                                                 for r in synthetic_records(60, seed=5)])))
        settings["train_source"] = str(train)
    if "tokenizer" in change:
        dm = QADataModule(pretrained="builtin:tiny-llama", source=str(source), max_length=384,
                          cache_dir=str(tmp_path / "cache"))
        dm.formatter.tokenizer.add_tokens(["<medqa-extra>"])
        dm.setup("fit")
    else:
        dm = module(tmp_path, **settings)
    assert dm.built_cache and dm.cache.folder != base.cache.folder
    if "tokenizer" not in change:
        same_as_tokenizing(dm)
    source.write_text(original)
    assert module(tmp_path).cache.folder == base.cache.folder  # the first is still there, and used
    assert not module(tmp_path).built_cache


def damage(folder, how):
    arrow, manifest = folder / "train.arrow", folder / MANIFEST
    if how == "bytes flipped":
        data = bytearray(arrow.read_bytes())
        data[len(data) // 2] ^= 0xFF
        arrow.write_bytes(bytes(data))
    elif how == "file cut short":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif how == "manifest not JSON":
        manifest.write_text("{not json")
    elif how == "another key":
        m = json.loads(manifest.read_text())
        m["key"]["max_length"] = 999
        manifest.write_text(json.dumps(m))
    elif how == "token ids out of range, digest matching":  # a file written elsewhere, its manifest made to match
        table = pa.ipc.open_file(pa.OSFile(str(arrow))).read_all()  # a copy: the file is rewritten
        ids = pa.array([[10**7] + row[1:] for row in table.column("input_ids").to_pylist()], pa.list_(pa.int32()))
        table = table.set_column(1, "input_ids", ids)
        with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table)
        m = json.loads(manifest.read_text())
        m["splits"]["train"].update(bytes=arrow.stat().st_size, sha256=file_digest(arrow))
        manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["bytes flipped", "file cut short", "manifest not JSON", "another key",
                                 "token ids out of range, digest matching"])
@pytest.mark.slow
def test_a_damaged_or_foreign_cache_is_rebuilt_and_never_used(tmp_path, source, caplog, how):
    folder = module(tmp_path).cache.folder
    damage(folder, how)
    dm = module(tmp_path)
    assert dm.built_cache and dm.cache.folder == folder
    assert "is damaged or foreign" in caplog.text and "building it again" in caplog.text
    same_as_tokenizing(dm)
    assert not module(tmp_path).built_cache


def _setup_in_a_process(tmp_path, queue):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    queue.put(module(tmp_path).built_cache)


@pytest.mark.slow
def test_two_processes_build_once_and_both_map_it(tmp_path, source, medqa_cache):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_setup_in_a_process, args=(tmp_path, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    built = sorted(queue.get(timeout=300) for _ in workers)
    for w in workers:
        w.join(60)
    assert built == [False, True]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1
    assert not module(tmp_path).built_cache


def test_a_resume_is_checked_by_the_cache_key_and_old_checkpoints_by_their_examples(tmp_path, source):
    from medqa.records import DataError

    dm = module(tmp_path)
    ours = dm.identity()
    dm._check_identity(ours)
    with pytest.raises(DataError, match=r"the tokenized examples \(sources, tokenizer or prompt\) differ"):
        dm._check_identity({**ours, "examples_key": "0" * 64})
    legacy = {k: v for k, v in ours.items() if k != "examples_key"}
    dm._check_identity({**legacy, "train_sha256": examples_sha256(dm.examples["train"])})  # saved before the cache: still resumes
    with pytest.raises(DataError, match="the tokenized training examples differ"):
        dm._check_identity({**legacy, "train_sha256": "0" * 64})
