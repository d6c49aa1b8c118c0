"""Hostile and mismatched files: a checkpoint never decides which code runs, a resume never
crosses runs, data or base models, adapters never go stale, damaged files get one line."""

import json
import re
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import inprocess
from medqa.checkpoints import CheckpointError, adapter_dir, adapter_matches
from medqa.cli import main
from medqa.records import DataError
from medqa.model import CheckpointMismatch

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def cli(*args: str, logs: Path):
    return main([args[0], "--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs),
                 "--trainer.enable_progress_bar", "false", *args[1:]])


def run_cli(*args: str, logs: Path) -> subprocess.CompletedProcess:
    """`python -m medqa ...` as a user types it: exit code and output (in this process: `inprocess`)."""
    return inprocess.run([args[0], "--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs),
                          "--trainer.enable_progress_bar", "false", *args[1:]])


SHORT = ("--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short finished run: (logs, its last.ckpt)."""
    logs = tmp_path_factory.mktemp("logs")
    fitted = cli("fit", *SHORT, logs=logs)
    return logs, Path(fitted.trainer.log_dir) / "checkpoints" / "last.ckpt"


def hostile_model_dir(root: Path) -> tuple[Path, Path]:
    """A model folder whose tokenizer asks for its own Python code, which would leave a
    marker file if it ever ran."""
    from medqa.backends import resolve_pretrained

    folder = root / "hostile-model"
    shutil.copytree(resolve_pretrained("builtin:tiny-llama"), folder)
    marker = root / "code-ran"
    (folder / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, marker


def with_settings(checkpoint: Path, out: Path, **hparams) -> Path:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"].update(hparams)
    torch.save(state, out)
    return out


# ------------------------------------------------------------------ 1. a checkpoint chooses code


@pytest.mark.slow
def test_export_takes_the_base_and_remote_code_from_the_user_not_the_checkpoint(trained, tmp_path):
    _, last = trained
    folder, marker = hostile_model_dir(tmp_path)
    hostile = with_settings(last, tmp_path / "hostile.ckpt", pretrained=str(folder), trust_remote_code=True,
                            backend="unsloth", dtype="float16")
    out = main(["export", "--ckpt_path", str(hostile), "--pretrained", "builtin:tiny-llama", "--out",
                str(tmp_path / "export"), "--merged", "--merged_dtype", "float32"])
    assert not marker.exists()
    prompt = json.loads((out / "medqa_prompt.json").read_text())
    assert prompt["base_model"] == "builtin:tiny-llama"
    # and test / predict build the model from the command line's settings alone
    cli("validate", "--ckpt_path", str(hostile), logs=tmp_path)
    assert not marker.exists()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(saved=st.fixed_dictionaries({}, optional={
    "pretrained": st.sampled_from(["HOSTILE", "unsloth/some-model", "", "builtin:tiny-llama"]),
    "trust_remote_code": st.booleans(),
    "backend": st.sampled_from(["unsloth", "hf", "auto", "os.system"]),
    "dtype": st.sampled_from(["bfloat16", "float16", "__import__"]),
}))
def test_no_saved_setting_changes_which_code_export_runs(trained, tmp_path_factory, saved):
    _, last = trained
    root = tmp_path_factory.mktemp("prop")
    folder, marker = hostile_model_dir(root)
    saved = {k: (str(folder) if v == "HOSTILE" else v) for k, v in saved.items()}
    hostile = with_settings(last, root / "h.ckpt", **saved)
    out = main(["export", "--ckpt_path", str(hostile), "--pretrained", "builtin:tiny-llama", "--out", str(root / "out")])
    assert not marker.exists() and (out / "adapter_model.safetensors").is_file()


def test_the_users_remote_code_flag_is_what_lets_a_model_run_its_code(trained, tmp_path):
    _, last = trained
    folder, marker = hostile_model_dir(tmp_path)
    main(["export", "--ckpt_path", str(last), "--pretrained", str(folder), "--out", str(tmp_path / "o")])
    assert not marker.exists()  # the folder's own tokenizer.json is used; its Python is not
    try:
        main(["export", "--ckpt_path", str(last), "--pretrained", str(folder), "--out", str(tmp_path / "p"),
              "--trust_remote_code"])
    except Exception:
        pass  # the planted module has no tokenizer class; what matters is that it ran only now
    assert marker.exists()


# ------------------------------------------------------------------ 2. a resume crosses runs or data


@pytest.mark.slow
def test_resume_on_another_fold_or_max_length_is_refused(trained, tmp_path):
    logs, last = trained
    more = ("--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2")
    with pytest.raises(DataError, match=r"fold: checkpoint 0, this run 1.*tokenized examples .*differ"):
        cli("fit", *more, "--ckpt_path", str(last), "--data.fold", "1", logs=tmp_path)
    with pytest.raises(DataError, match=r"max_length: checkpoint 512, this run 150.*tokenized examples .*differ"):
        cli("fit", *more, "--ckpt_path", str(last), "--data.max_length", "150", logs=tmp_path)


def test_resuming_a_finished_run_is_refused_not_silently_continued(trained):
    logs, _ = trained
    done = run_cli("fit", *SHORT, "--ckpt_path", "last", logs=logs)
    assert done.returncode == 1
    assert "comes from a run that finished (2 of --trainer.max_epochs 2 epochs done)" in done.stderr
    assert "Traceback" not in done.stderr


def lora_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_a_finished_run_given_more_epochs_trains_on_with_its_schedule_replanned(trained, tmp_path):
    _, last = trained
    run = shutil.copytree(last.parent.parent, tmp_path / "demo" / "fit-0")
    before = lora_weights(run / "checkpoints" / "last.ckpt")
    more = ("--trainer.max_epochs", "4", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2")
    done = run_cli("fit", *more, "--ckpt_path", "last", logs=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("The checkpoint's learning-rate schedule ends at step 6 and this run trains to step 12: warm-up + cosine "
            "re-planned over 12 steps; at step 6 the learning rate goes from 0 to 0.0") in done.stdout + done.stderr
    after = lora_weights(run / "checkpoints" / "last.ckpt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert all(not torch.equal(before[k], after[k]) for k in before)  # at learning rate 0 none would move


@pytest.mark.slow
def test_a_new_fit_never_continues_an_earlier_runs_schedule(trained, tmp_path):
    _, last = trained
    shutil.copytree(last.parent.parent, tmp_path / "demo" / "fit-0")
    (tmp_path / "demo" / "fit-1").mkdir()  # a run killed before its first checkpoint
    (tmp_path / "demo" / "fit-1" / "config.yaml").write_text("{}\n")
    more = ("--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2")
    done = run_cli("fit", *more, "--ckpt_path", "last", logs=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the newest fit run under" in done.stdout + done.stderr and "starting a new run" in done.stdout + done.stderr
    assert torch.load(tmp_path / "demo" / "fit-2" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert not (tmp_path / "demo" / "fit-0" / "config.resume1.yaml").exists()


def test_another_base_with_the_same_name_and_shape_is_refused(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from medqa.backends import resolve_pretrained

    _, last = trained
    original = resolve_pretrained("builtin:tiny-llama")
    other = tmp_path / "elsewhere" / "builtin:tiny-llama"  # the name the checkpoint records, the same config
    shutil.copytree(original, other)
    weights = load_file(other / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match=r"base model weights_sha256"):
        cli("validate", "--ckpt_path", str(last), "--model.pretrained", str(other), logs=tmp_path)


# ------------------------------------------------------------------ 3. a stale adapter


@pytest.mark.slow
def test_a_stale_or_missing_adapter_is_rewritten_from_its_checkpoint(trained, tmp_path):
    logs, last = trained
    copy = tmp_path / "copy.ckpt"
    shutil.copy(last, copy)
    state = torch.load(last, map_location="cpu", weights_only=True)
    older = {**state, "state_dict": {k: torch.zeros_like(v) for k, v in state["state_dict"].items()}}
    from medqa.checkpoints import save_adapter

    save_adapter(older, adapter_dir(copy))  # what a kill between the two renames leaves
    assert not adapter_matches(state, adapter_dir(copy))
    cli("validate", "--ckpt_path", str(copy), logs=tmp_path)
    assert adapter_matches(state, adapter_dir(copy))
    shutil.rmtree(adapter_dir(copy))
    cli("validate", "--ckpt_path", str(copy), logs=tmp_path)
    assert adapter_matches(state, adapter_dir(copy))


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_and_adapter(trained, tmp_path, monkeypatch):
    from medqa import checkpoints

    _, last = trained
    state = torch.load(last, map_location="cpu", weights_only=True)
    path = tmp_path / "best.ckpt"
    io = checkpoints.AtomicCheckpointIO()
    io.save_checkpoint(state, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    newer = {**state, "state_dict": {k: v + 1 for k, v in state["state_dict"].items()}}
    monkeypatch.setattr(checkpoints, "save_file", disk_full, raising=False)
    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint(newer, path)
    assert adapter_matches(torch.load(path, map_location="cpu", weights_only=True), adapter_dir(path))
    assert adapter_matches(state, adapter_dir(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.adapter", "best.ckpt"]  # no leftovers


# ------------------------------------------------------------------ 4. paths the command does not own


def test_export_leaves_the_users_neighbouring_folders_alone(trained, tmp_path):
    _, last = trained
    mine = tmp_path / "out.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    main(["export", "--ckpt_path", str(last), "--pretrained", "builtin:tiny-llama", "--out", str(tmp_path / "out")])
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]


# ------------------------------------------------------------------ the prompt travels with the checkpoint


def test_a_checkpoint_trained_under_another_prompt_is_refused(trained, tmp_path):
    _, last = trained
    done = run_cli("test", "--ckpt_path", str(last), "--data.system_prompt", "You are a terse assistant.", logs=tmp_path)
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("medqa test: error: the checkpoint was trained with other prompt settings (system: checkpoint "
                            "'You are a biomedical research assistant.")
    assert "this run 'You are a terse assistant.'" in error and "--data.system_prompt" in error


@pytest.mark.slow
def test_export_and_ask_use_the_checkpoints_prompt_not_todays(tmp_path):
    from medqa.ask import main as ask

    system = "You are a careful clinician. Answer yes, no or maybe."
    fitted = cli("fit", *SHORT, "--data.system_prompt", system, logs=tmp_path / "logs")
    last = Path(fitted.trainer.log_dir) / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(last), "--pretrained", "builtin:tiny-llama", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "medqa_prompt.json").read_text())
    assert saved["system_prompt"] == system and saved["prompt_saved_in_checkpoint"] is True
    assert system in saved["example_prompt"]
    question = ["--question", "Does it work?", "--context", "It worked in most patients."]
    common = ["--config", DEMO, "--ckpt_path", str(last), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    with pytest.raises(DataError, match="other prompt settings \\(system: checkpoint 'You are a careful clinician"):
        ask([*question, *common])  # today's default prompt against the checkpoint's
    answer = ask([*question, *common, "--data.system_prompt", system])
    assert answer["decision"] in ("yes", "no", "maybe")


# ------------------------------------------------------------------ 7. damaged and foreign checkpoints


@pytest.mark.parametrize("name, make, message", [
    ("empty.ckpt", lambda p, s: p.write_bytes(b""), r"empty\.ckpt is empty \(0 bytes\), not a checkpoint"),
    ("noise.ckpt", lambda p, s: p.write_bytes(os.urandom(4096)), r"noise\.ckpt is damaged or not a PyTorch checkpoint"),
    ("plain.ckpt", lambda p, s: torch.save(s["state_dict"], p), r"plain\.ckpt is a plain state dict \(\d+ tensors\)"),
    ("other.ckpt", lambda p, s: torch.save({"epoch": 1, "model": 3}, p), r"other\.ckpt is not a Lightning checkpoint: it has no 'state_dict'"),
    ("pickle.ckpt", lambda p, s: torch.save({"state_dict": {}, "x": Path("/")}, p), r"pickle\.ckpt holds Python objects that loading would execute"),
])
def test_damaged_or_foreign_checkpoints_get_one_line(trained, tmp_path, name, make, message):
    _, last = trained
    path = tmp_path / name
    make(path, torch.load(last, map_location="cpu", weights_only=True))
    with pytest.raises(CheckpointError, match=message):
        cli("validate", "--ckpt_path", str(path), logs=tmp_path)
    if name == "empty.ckpt":  # as a user sees it: one line, exit code 1, no traceback
        done = run_cli("validate", "--ckpt_path", str(path), logs=tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("medqa validate: error: ")


@pytest.mark.slow
def test_lora_targets_in_another_order_are_the_same_targets(trained, tmp_path):
    _, last = trained
    targets = ["down_proj", "up_proj", "gate_proj", "o_proj", "v_proj", "k_proj", "q_proj"]
    cli("validate", "--ckpt_path", str(last), "--model.target_modules", json.dumps(targets), logs=tmp_path)
    with pytest.raises(CheckpointMismatch, match="target_modules"):
        cli("validate", "--ckpt_path", str(last), "--model.target_modules", json.dumps(targets[1:]), logs=tmp_path)


# ------------------------------------------------------------------ 5 and 6 as a user meets them


@pytest.mark.slow
def test_fooling_files_are_refused_in_one_line_by_the_commands(tmp_path):
    from medqa.tasks.pubmedqa import official_split
    from medqa.tasks.pubmedqa import synthetic_records

    truth = {r.id: r.decision for r in official_split(synthetic_records())["test"]}
    first = next(iter(truth))
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(truth)[:-1] + f', "{first}": "maybe"}}')  # one id answered twice
    done = inprocess.run(["evaluate", str(predictions), "--source", "synthetic"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"predictions.json: key '{first}' appears more than once" in done.stderr

    test = official_split(synthetic_records())["test"][0]
    record = {"pubid": test.id, "question": test.question, "context": {"contexts": test.contexts},
              "long_answer": test.long_answer, "final_decision": test.decision}
    leaky = tmp_path / "train.jsonl"
    leaky.write_text(json.dumps(record) + "\n")
    done = run_cli("fit", "--data.train_source", str(leaky), logs=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "1 of its 1 questions are dev or test questions" in done.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ a refused command changes nothing


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def one_line_refusal(done: subprocess.CompletedProcess, command: str, message: str) -> None:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medqa {command}: error: ") and message in last, last


def test_a_refused_resume_leaves_the_run_as_it_was(trained, tmp_path):
    _, last = trained
    run = shutil.copytree(last.parent.parent, tmp_path / "demo" / "fit-0")
    before = files(run)
    more = ("--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2")
    done = run_cli("fit", *more, "--ckpt_path", "last", "--model.lora_alpha", "32", logs=tmp_path)
    one_line_refusal(done, "fit", "lora_alpha: checkpoint 16, this run 32")
    assert files(run) == before  # no config.resume1.yaml, no event file
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["fit-0"]


@pytest.mark.slow
def test_a_refused_export_writes_nothing_and_keeps_a_linked_folder_a_link(trained, tmp_path):
    _, last = trained
    wrong = with_settings(last, tmp_path / "r.ckpt", lora_r="8")
    out = tmp_path / "out"
    done = inprocess.run(["export", "--ckpt_path", str(wrong), "--pretrained", "builtin:tiny-llama", "--out", str(out)])
    one_line_refusal(done, "export", "saved setting lora_r='8' is not of type int")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.ckpt"]
    state = torch.load(last, map_location="cpu", weights_only=True)
    state["QADataModule"]["prompt"]["task"] = "no_such_task"
    torch.save(state, tmp_path / "t.ckpt")
    with pytest.raises(CheckpointError, match="the checkpoint's saved task"):
        main(["export", "--ckpt_path", str(tmp_path / "t.ckpt"), "--pretrained", "builtin:tiny-llama", "--out", str(out)])
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    main(["export", "--ckpt_path", str(last), "--pretrained", "builtin:tiny-llama", "--out", str(tmp_path / "link")])
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("part, value, message", [
    ("identity", "abc", "saved data identity is a str, not a mapping"),
    ("loops", [], "its 'loops' is a list, not a dict"),
    ("QADataModule", [], "its 'QADataModule' is a list, not a dict"),
    ("train_position", ["x"], "cannot resume the training order"),
])
def test_saved_values_of_the_wrong_type_get_one_line(trained, tmp_path, part, value, message):
    _, last = trained
    state = torch.load(last, map_location="cpu", weights_only=True)
    if part in ("identity", "train_position"):
        state["QADataModule"][part] = value
    else:
        state[part] = value
    torch.save(state, tmp_path / "bad.ckpt")
    more = ("--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2")
    one_line_refusal(run_cli("fit", *more, "--ckpt_path", str(tmp_path / "bad.ckpt"), logs=tmp_path), "fit", message)


def test_best_passes_over_a_run_whose_saved_targets_are_not_names(trained, tmp_path):
    _, last = trained
    for name in ("fit-0", "fit-1"):
        shutil.copytree(last.parent.parent, tmp_path / "demo" / name)
    hparams = tmp_path / "demo" / "fit-1" / "hparams.yaml"
    hparams.write_text(hparams.read_text() + "target_modules:\n- [q_proj]\n- [v_proj]\n")
    done = run_cli("validate", "--ckpt_path", "best", logs=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fit-0/checkpoints/best" in done.stdout + done.stderr


@pytest.mark.slow
def test_more_refusals_in_one_line(trained, tmp_path):
    _, last = trained
    one_line_refusal(run_cli("validate", "--ckpt_path", str(last), "--model.target_modules", '["no_such_proj"]', logs=tmp_path),
                     "validate", "--model.target_modules ['no_such_proj']: builtin:tiny-llama has no such linear layers; "
                     "its are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    one_line_refusal(run_cli("predict", "--ckpt_path", str(last), "--trainer.limit_predict_batches", "2", logs=tmp_path),
                     "predict", "none was written. Leave out --trainer.limit_predict_batches")
    done = inprocess.run(["cv", "--config", DEMO, "--data.task", "medqa_usmle", "--cv_dir", str(tmp_path / "cv")])
    one_line_refusal(done, "cv", "medqa_usmle has one fixed dev set and nothing to cross-validate")
    assert not (tmp_path / "cv").exists()


@pytest.mark.slow
def test_a_hostile_init_adapter_folder_gets_one_line(trained, tmp_path):
    """An adapter_config.json nested 100,000 levels, and a safetensors header that claims more
    than the file holds: one line each, naming the folder (issue 42, class 4)."""
    logs, last = trained
    exported = main(["export", "--ckpt_path", str(last), "--pretrained", "builtin:tiny-llama", "--out", str(tmp_path / "a")])
    deep = shutil.copytree(exported, tmp_path / "deep")
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_refusal(run_cli("fit", *SHORT, "--model.init_adapter", str(deep), logs=tmp_path / "l1"), "fit",
                     f"--model.init_adapter {deep}: adapter_config.json: nested too deeply to read")
    lying = shutil.copytree(exported, tmp_path / "lying")
    weights = lying / "adapter_model.safetensors"
    data = weights.read_bytes()
    header = int.from_bytes(data[:8], "little")
    weights.write_bytes((header + 10_000_000).to_bytes(8, "little") + data[8:])
    one_line_refusal(run_cli("fit", *SHORT, "--model.init_adapter", str(lying), logs=tmp_path / "l2"), "fit",
                     f"--model.init_adapter {lying}: not a PEFT adapter folder")


@pytest.mark.slow
def test_best_and_last_pass_over_runs_of_another_target_and_say_so(trained, tmp_path):
    """A long-answer run beside decision runs of the same LoRA (its val/macro_f1 reads the gold
    conclusion): `best` and `last` of a decision command never take it (issue 42, class 9)."""
    logs, last = trained
    logs = shutil.copytree(logs, tmp_path / "logs")
    other = cli("fit", *SHORT, "--data.target", "long_answer", logs=logs)
    other_run = Path(other.trainer.log_dir).name
    for which in ("best", "last"):
        done = run_cli("validate", "--ckpt_path", which, logs=logs)
        assert done.returncode == 0, done.stderr[-3000:]
        said = done.stdout + done.stderr
        chosen = said.split(f"--ckpt_path {which} -> ", 1)[1].split()[0]
        assert f"/{other_run}/" not in chosen and f"/{last.parent.parent.name}/" in chosen
        assert f"passed over runs trained with another target or reasoning setting" in said
        assert f"{other_run} (target long_answer)" in said


@pytest.mark.slow
def test_the_model_card_writes_paths_and_keys_as_one_escaped_line(trained, tmp_path):
    """`export` of a run whose experiment folder and checkpoint names hold newlines, `---`,
    backticks or HTML, beside a metrics.json with such a key: each stays one code span in its
    table row, nothing opens a new block (issue 42, class 6)."""
    _, last = trained
    run = shutil.copytree(last.parent.parent, tmp_path / "exp\n---\n<script>x</script>" / "fit-0")
    ckpt = run / "checkpoints" / "best`|`\n# heading.ckpt"
    shutil.copyfile(last, ckpt)
    (run.parent / "test-1").mkdir()
    (run.parent / "test-1" / "metrics.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), "<img src=x onerror=alert(1)>\n\n---\ntest/acc": 0.5}))
    done = inprocess.run(["export", "--ckpt_path", str(ckpt), "--pretrained", "builtin:tiny-llama",
                          "--out", str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr[-3000:]
    card = (tmp_path / "out" / "README.md").read_text()
    body = card.split("---\n", 2)[2]  # after the front matter
    assert "\n---\n" not in body and "\n# heading" not in body and "\n<script>" not in body and "\n<img" not in body
    assert "| `<img src=x onerror=alert(1)> --- test/acc` | 0.5000 |" in body  # the key, one escaped line
    for row in [line for line in body.splitlines() if line.startswith("| ")]:
        cells = [c for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) in (2, 3), row  # no cell split by a | from a path
    lines, i, blocks = body.splitlines(), 0, 0
    while i < len(lines):  # each fenced block closes on its own fence, its text (paths included) inside
        opening = re.match(r"(`{3,})\w*$", lines[i])
        if opening:
            close = next(j for j in range(i + 1, len(lines)) if lines[j] == opening.group(1))
            assert all(not line.startswith(opening.group(1)) for line in lines[i + 1 : close])
            blocks, i = blocks + 1, close
        i += 1
    assert blocks == 4 and "## Use it" in body and "## Scores" in body  # training, python, upload, vLLM


@pytest.mark.slow
def test_cache_folders_replaced_by_links_or_unwritable_get_one_line(tmp_path):
    """A tokenized-example folder replaced by a link to a user's folder is neither followed
    nor deleted; an unwritable cache is named; a build killed part-way is cleaned up by the
    next one (issue 42, class 3)."""
    def score(cache: Path) -> subprocess.CompletedProcess:
        return run_cli("test", "--data.cache_dir", str(cache), "--trainer.limit_test_batches", "1", logs=tmp_path / "logs")

    cache = tmp_path / "cache"
    assert score(cache).returncode == 0
    folder = next(p for p in cache.iterdir() if p.is_dir())
    shutil.rmtree(folder)
    stale = cache / f".{folder.name}.99999.partial"
    stale.mkdir()
    (stale / "train.arrow").write_bytes(b"half")
    assert score(cache).returncode == 0 and folder.is_dir() and not stale.exists()

    users = tmp_path / "my-notes"
    users.mkdir()
    (users / "precious.txt").write_text("keep me")
    shutil.rmtree(folder)
    folder.symlink_to(users)
    one_line_refusal(score(cache), "test", f"{folder} is a symbolic link, not the tokenized examples medqa built")
    assert (users / "precious.txt").read_text() == "keep me" and folder.is_symlink()

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    one_line_refusal(score(blocked / "cache"), "test", f"{blocked / 'cache'}: cannot keep the tokenized examples there")
