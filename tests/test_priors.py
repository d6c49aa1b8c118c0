"""The class-prior correction: fitted on held-out predictions (`python -m medqa priors`),
written as a config, and applied by the model's scoring (`--model.label_bias`)."""

import json
import math
import shutil
from pathlib import Path

import inprocess
import pytest
import torch

from medqa.evaluate import official_scores
from medqa.priors import fit_label_bias, macro_f1, read_predictions
from medqa.records import DataError

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("yes", "no", "maybe")


def skewed(n_labels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of a model that ranks the answers well but leans to the first label,
    on PQA-L's test proportions."""
    g = torch.Generator().manual_seed(seed)
    counts = [276, 169, 55] if n_labels == 3 else [200, 150, 100, 50]
    truth = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    logits = torch.randn(len(truth), n_labels, generator=g)
    logits[torch.arange(len(truth)), truth] += 1.0
    logits[:, 0] += 1.5
    return logits.log_softmax(-1), truth


def test_macro_f1_is_the_official_scorers():
    g = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 3, (200,), generator=g)
    predicted = torch.randint(0, 2, (4, 200), generator=g)  # "maybe" never answered
    predicted[3] = 0  # one label only
    ours = macro_f1(predicted, truth, 3)
    for row, value in zip(predicted, ours):
        official = official_scores([LABELS[t] for t in truth], [LABELS[p] for p in row], LABELS)["macro_f1"]
        assert abs(float(value) - official) < 1e-9


@pytest.mark.parametrize("n_labels", [3, 4])
def test_the_fitted_bias_raises_macro_f1_of_a_model_that_leans_to_one_answer(n_labels):
    log_probs, truth = skewed(n_labels)
    bias = fit_label_bias(log_probs, truth)
    assert len(bias) == n_labels and bias[0] == 0.0 and all(b > 0 for b in bias[1:])  # away from the first label
    before = float(macro_f1(log_probs.argmax(-1)[None], truth, n_labels))
    after = float(macro_f1((log_probs + torch.tensor(bias)).argmax(-1)[None], truth, n_labels))
    assert after > before + 0.05
    assert fit_label_bias(log_probs, truth) == bias  # the same answer every time


def test_a_balanced_model_keeps_a_bias_near_zero():
    g = torch.Generator().manual_seed(2)
    truth = torch.randint(0, 3, (600,), generator=g)
    logits = torch.randn(600, 3, generator=g)
    logits[torch.arange(600), truth] += 3.0
    bias = fit_label_bias(logits.log_softmax(-1), truth)
    assert max(abs(b) for b in bias) < 1.0


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_predictions_are_read_checked_naming_the_line_and_field(tmp_path):
    good = {"id": "1", "label": "yes", "p_yes": 0.7, "p_no": 0.2, "p_maybe": 0.1, "truth": "yes"}
    ids, log_probs, truth = read_predictions(write_rows(tmp_path / "ok.jsonl", [good, {**good, "id": "2"}]), LABELS)
    assert ids == ["1", "2"] and truth.tolist() == [0, 0]
    assert torch.allclose(log_probs[0].exp(), torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    for row, field in (({**good, "id": "2", "p_no": "high"}, "p_no"), ({**good, "id": "2", "truth": None}, "'truth'"),
                       ({**good, "p_maybe": 0.0}, "'id'"), ("[1, 2]", "expected an object"),
                       ({**good, "id": "2", "p_yes": math.nan}, "p_yes")):
        with pytest.raises(DataError, match=f"bad.jsonl: line 2.*{field}"):
            read_predictions(write_rows(tmp_path / "bad.jsonl", [good, row]), LABELS)


def test_a_label_bias_of_the_wrong_length_is_refused_in_one_line(tmp_path):
    done = inprocess.run(["test", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.label_bias", "[0.5, 1]",
                          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert done.returncode != 0
    assert "--model.label_bias needs one finite number for each of yes, no, maybe, got [0.5, 1.0]" in done.stderr
    assert "Traceback" not in done.stderr


def test_priors_writes_a_config_that_predict_applies(demo_fit, tmp_path):
    logs = shutil.copytree(demo_fit[0], tmp_path / "logs")
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger.init_args.save_dir", str(logs),
              "--ckpt_path", "best", "--trainer.enable_progress_bar", "false"]

    def predict(where: str, *extra: str) -> list[dict]:
        done = inprocess.run(["predict", *common, "--predictions.output_dir", str(tmp_path / where), *extra])
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in (tmp_path / where / "predictions.jsonl").read_text().splitlines()]

    dev = predict("dev", "--data.predict_split", "dev")
    bias_file = tmp_path / "label_bias.yaml"
    done = inprocess.run(["priors", str(tmp_path / "dev" / "predictions.jsonl"), "--out", str(bias_file)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Label bias for yes, no, maybe: " in done.stdout and f"On these {len(dev)} predictions" in done.stdout
    again = inprocess.run(["priors", str(tmp_path / "dev" / "predictions.jsonl"), "--out", str(bias_file)])
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr  # not replaced

    import yaml

    bias = yaml.safe_load(bias_file.read_text())["model"]["label_bias"]
    plain, corrected = predict("plain"), predict("corrected", "--config", str(bias_file))
    assert [r["id"] for r in plain] == [r["id"] for r in corrected]
    for p, c in zip(plain, corrected):
        expected = torch.tensor([math.log(max(p[f"p_{w}"], 1e-12)) for w in LABELS]) + torch.tensor(bias)
        assert torch.allclose(torch.tensor([c[f"p_{w}"] for w in LABELS]), expected.softmax(-1), atol=2e-5)
        assert c["label"] == LABELS[int(expected.argmax())]
