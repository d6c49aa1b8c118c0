"""Official PubMedQA scoring: the same figures as the authors' scikit-learn scorer."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score

from medqa.evaluate import EvaluationError, evaluate, main, official_scores, read_answers
from medqa.tasks.pubmedqa import LABELS

LABEL = st.sampled_from(["yes", "no", "maybe"])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(LABEL, LABEL), min_size=1, max_size=80))
def test_scores_equal_the_official_scikit_learn_calls(pairs):
    truth, predicted = [t for t, _ in pairs], [p for _, p in pairs]
    scores = official_scores(truth, predicted, LABELS)
    # The official evaluation.py: accuracy_score(truth, preds), f1_score(truth, preds, average="macro").
    assert scores["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)


def test_refuses_missing_and_extra_ids_naming_them():
    truth = {"1": "yes", "2": "no", "3": "maybe"}
    with pytest.raises(EvaluationError, match=r"1 test questions have no answer \(e\.g\. 2\); "
                                              r"1 answers are for questions not in the test set \(e\.g\. 9\)"):
        evaluate({"1": "yes", "3": "no", "9": "no"}, truth, "p.json")
    with pytest.raises(EvaluationError, match=r"all and only the 3 test questions: 1 test questions have no answer"):
        evaluate({"1": "yes", "3": "no"}, truth, "p.json")
    assert evaluate({"3": "maybe", "1": "yes", "2": "yes"}, truth, "p.json")["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("text, message", [
    ('{"1": "yes",', r"not valid JSON \(.* at line 1"),
    ('["yes"]', r"expected a JSON object \{question id: label\}, got a list"),
    ('{"1": "Yes", "2": "no", "3": 1}', r"2 entries are not one of yes, no, maybe \(e\.g\. '1': 'Yes', '3': 1\)"),
    ('{"1": "yes", "2": "no", "1": "no"}', r"key '1' appears more than once"),
    ("{}", r"holds no answers"),
    ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    (b'{"1": "\xe9"}', r"not UTF-8 text"),
])
def test_bad_prediction_files_get_a_clear_error(tmp_path, text, message):
    path = tmp_path / "predictions.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(EvaluationError, match=r"predictions file .*predictions\.json: " + message):
        read_answers(path, "predictions", LABELS)


def test_missing_file_and_existing_output_are_refused(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        main([str(tmp_path / "nope.json"), "--source", "synthetic"])
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"1": "yes"}))
    out = tmp_path / "scores.json"
    out.write_text("{}")
    with pytest.raises(EvaluationError, match="scores.json exists"):
        main([str(truth), "--truth", str(truth), "--out", str(out)])
    assert out.read_text() == "{}"  # not overwritten
