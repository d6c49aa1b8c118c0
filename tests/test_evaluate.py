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


# ---------------------------------------------------------------- compare


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(LABEL, LABEL, LABEL), min_size=2, max_size=60))
def test_compare_point_scores_are_the_official_ones_and_identical_files_differ_by_zero(triples):
    from sklearn.metrics import recall_score

    from medqa.compare import compare

    truth = {str(i): t for i, (t, _, _) in enumerate(triples)}
    base = {str(i): b for i, (_, b, _) in enumerate(triples)}
    tuned = {str(i): p for i, (_, _, p) in enumerate(triples)}
    result = compare(base, tuned, truth, LABELS, draws=200)
    for name, answers in (("base", base), ("tuned", tuned)):
        ours, keys = result["models"][name], sorted(truth)
        official = official_scores([truth[k] for k in keys], [answers[k] for k in keys], LABELS)
        assert ours["acc"] == pytest.approx(official["accuracy"]) and ours["macro_f1"] == pytest.approx(official["macro_f1"])
        assert ours["acc_95"][0] <= ours["acc"] + 1e-9 or len(truth) < 5  # the interval brackets the point, as a rule
        recall = recall_score([truth[k] for k in keys], [answers[k] for k in keys], labels=list(LABELS), average=None,
                              zero_division=0)
        assert [ours[f"recall_{w}"] for w in LABELS] == pytest.approx(list(recall))
    assert result["difference"]["macro_f1"]["value"] == pytest.approx(
        result["models"]["tuned"]["macro_f1"] - result["models"]["base"]["macro_f1"])
    same = compare(base, dict(base), truth, LABELS, draws=200)["difference"]
    assert same["acc"]["paired_95"] == [0.0, 0.0] and same["macro_f1"]["paired_95"] == [0.0, 0.0]


def test_compare_a_clear_gain_has_an_interval_above_zero_and_files_must_answer_the_truth(tmp_path, capsys):
    from medqa.compare import main as compare_main

    truth = {str(i): ["yes", "no", "maybe"][i % 3] for i in range(300)}
    paths = {}
    for name, answers in (("base", dict.fromkeys(truth, "yes")), ("tuned", dict(truth)), ("truth", truth)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(answers))
    result = compare_main([str(paths["base"]), str(paths["tuned"]), "--truth", str(paths["truth"]),
                           "--out", str(tmp_path / "c.json")])
    assert result["majority"]["acc"] == pytest.approx(1 / 3) and result["models"]["fine-tuned"]["acc"] == 1.0
    assert result["difference"]["macro_f1"]["paired_95"][0] > 0.5
    assert "| majority (all yes) |" in capsys.readouterr().out
    with pytest.raises(EvaluationError, match="exists"):
        compare_main([str(paths["base"]), str(paths["tuned"]), "--truth", str(paths["truth"]), "--out", str(tmp_path / "c.json")])
    del truth["7"]
    paths["truth"].write_text(json.dumps(truth))
    with pytest.raises(EvaluationError, match="answers are for questions not in the test set"):
        compare_main([str(paths["base"]), str(paths["tuned"]), "--truth", str(paths["truth"])])


def test_the_printed_scores_have_the_official_scripts_six_decimals(tmp_path, capsys):
    truth, predictions = tmp_path / "truth.json", tmp_path / "p.json"
    truth.write_text(json.dumps({"1": "yes", "2": "no", "3": "maybe"}))
    predictions.write_text(json.dumps({"1": "yes", "2": "yes", "3": "maybe"}))
    main([str(predictions), "--truth", str(truth)])
    out = capsys.readouterr().out
    assert "accuracy  0.666667" in out and "macro-F1  0.555556" in out  # evaluation.py prints Python floats' 6 places


def test_compare_refuses_two_rows_of_one_name_in_one_line(tmp_path):
    import inprocess

    answers = tmp_path / "a.json"
    answers.write_text(json.dumps({"1": "yes", "2": "no"}))
    done = inprocess.run(["compare", str(answers), str(answers), "--truth", str(answers), "--names", "run", "run"])
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("medqa compare: error: --names run run: the two rows need "
                                                    "different names")
