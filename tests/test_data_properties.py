"""Property-based tests: whatever the text, the answer is never cut, it sits inside the
sequence, and only the answer carries labels; readers give back what was written."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medqa.tokens import PromptFormat, collate
from medqa.records import DataError, object_items
from medqa.tasks.pubmedqa import Record, read_file, stream_file
from medqa.tasks.pubmedqa import LABELS

# Unicode of every kind, odd whitespace included, but no lone surrogates (not valid UTF-8).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
WHITESPACE = st.text(st.sampled_from(" \t\n\r\u00a0\u2003\u200b"), max_size=5)


@st.composite
def records(draw, ids=st.integers(1, 10**9)):
    n = draw(st.integers(0, 6))
    question = draw(WHITESPACE) + draw(TEXT.filter(lambda t: t.strip())) + draw(WHITESPACE)
    return Record(
        id=str(draw(ids)),
        question=question.strip(),
        contexts=draw(st.lists(st.one_of(TEXT, st.just(""), TEXT.map(lambda t: t * 20)), min_size=n, max_size=n)),
        context_labels=draw(st.lists(st.sampled_from(["BACKGROUND", "METHODS", "RESULTS", ""]), min_size=n, max_size=n)),
        long_answer=draw(TEXT),
        decision=draw(st.sampled_from(LABELS)),
    )


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("target", ["decision", "long_answer"])
@SETTINGS
@given(record=records(), max_length=st.integers(48, 700))
def test_answer_is_never_cut_and_only_it_is_labelled(tokenizer, target, record, max_length):
    fmt = PromptFormat(tokenizer, target, max_length)
    try:
        ex = fmt.encode(record)
    except DataError as e:
        # Allowed only when the question and answer alone do not fit, or when the long answer
        # to be learnt is empty, and said so.
        empty = target == "long_answer" and not record.long_answer.strip()
        assert f"record {record.id!r}" in str(e) and ("long answer, and it has none" in str(e) if empty else "max_length" in str(e))
        return
    word = fmt.label_token_ids()[record.label]
    assert len(ex.input_ids) == len(ex.labels) <= max_length
    assert 0 < ex.answer_pos and ex.answer_pos + len(word) < len(ex.input_ids)
    assert ex.input_ids[ex.answer_pos : ex.answer_pos + len(word)] == word
    first = next(i for i, t in enumerate(ex.labels) if t != -100)
    assert all(t == -100 for t in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]  # the whole answer, to the end
    if target == "decision":
        assert first == ex.answer_pos
    # The question is never cut: it decodes intact from the prompt.
    assert record.question in tokenizer.decode(ex.input_ids[:first])


@SETTINGS
@given(batch=st.lists(records(), min_size=1, max_size=6, unique_by=lambda r: r.id))
def test_collate_keeps_every_example_whole(tokenizer, batch):
    fmt = PromptFormat(tokenizer, "decision", 100_000)
    examples = [fmt.encode(r) for r in batch]
    out = collate(examples, pad_id=tokenizer.pad_token_id)
    assert out["ids"] == [r.id for r in batch]
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        assert out["input_ids"][i, :n].tolist() == e.input_ids and out["labels"][i, :n].tolist() == e.labels
        assert out["attention_mask"][i].sum() == n


@SETTINGS
@given(batch=st.lists(records(), min_size=1, max_size=8, unique_by=lambda r: r.id))
def test_readers_give_back_what_was_written(tmp_path_factory, batch):
    d = tmp_path_factory.mktemp("files")
    original = {r.id: {"QUESTION": r.question, "CONTEXTS": r.contexts, "LABELS": r.context_labels,
                       "LONG_ANSWER": r.long_answer, "final_decision": r.decision} for r in batch}
    hub = [{"pubid": r.id, "question": r.question, "context": {"contexts": r.contexts, "labels": r.context_labels},
            "long_answer": r.long_answer, "final_decision": r.decision} for r in batch]
    (d / "ori.json").write_text(json.dumps(original), encoding="utf-8")
    (d / "hub.jsonl").write_text("\n".join(json.dumps(h, ensure_ascii=False) for h in hub), encoding="utf-8")
    (d / "hub.json").write_text(json.dumps(hub, indent=1), encoding="utf-8")
    for name in ("ori.json", "hub.jsonl", "hub.json"):
        assert read_file(d / name) == batch, name
        assert list(stream_file(d / name)) == batch, name  # read a piece at a time


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)


@SETTINGS
@given(obj=st.dictionaries(TEXT, JSON, max_size=8), chunk=st.integers(1, 70), indent=st.sampled_from([None, 0, 2]),
       ascii_only=st.booleans())
def test_a_json_object_read_in_chunks_is_the_whole_files(tmp_path_factory, obj, chunk, indent, ascii_only):
    path = tmp_path_factory.mktemp("stream") / "object.json"
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
    assert list(object_items(path, chunk)) == list(obj.items())


VALID = json.dumps({"QUESTION": "Q?", "CONTEXTS": ["c"], "LABELS": ["L"], "LONG_ANSWER": "a", "final_decision": "yes"})


@pytest.mark.parametrize("text, message", [
    ('{"1": %s, "1": %s}' % (VALID, VALID), "key '1' appears more than once"),
    ('{"1": {"a": 1, "a": 2}}', "key 'a' appears more than once"),
    ('{"1": %s,}' % VALID, "not valid JSON"), ('{"1" 1}', "expected ':' after key '1'"),
    ('{"1": %s} {}' % VALID, "text after"), ('{"1": [1, 2', "not valid JSON"),
    ('{"1": %s "2": 2}' % VALID, "expected ',' or '}'"), ('{2: 1}', "not valid JSON"),
    ('\n\n{"1":\n tru}', "at line 4"), ("", "the file is empty"), ("[1, 2]", "record 0: expected an object"),
    ('"text"', "top level is a str"),
])
def test_a_streamed_file_is_refused_as_the_whole_file_is(tmp_path, text, message):
    path = tmp_path / "ori.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        list(stream_file(path))


@pytest.mark.parametrize("name", ["ori.json", "hub.jsonl"])
def test_a_streamed_file_that_is_not_utf8_is_refused_in_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'{"1": "\xff\xfe"}\n' if name == "ori.json" else b'{"pubid": 1, "question": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        list(stream_file(path))
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_file(path)
