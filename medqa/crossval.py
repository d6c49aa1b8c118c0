"""`python -m medqa cv [fit arguments] [--cv_dir DIR]`: PQA-L's 10-fold cross-validation,
the PubMedQA paper's protocol.

For each official fold k (0-9) it trains on the other nine folds with dev = fold k (`fit
--data.fold k`, every other fit argument as given), then scores the best checkpoint on
fold k. Each fold's run lives in DIR/fold{k}/ (curves, checkpoints) and its result in
DIR/fold{k}/result.json, written when the fold is done; at the end DIR/summary.json and
DIR/summary.md hold every fold's dev accuracy and macro-F1 and their mean and standard
deviation. Each fold's best checkpoint also answers its dev questions with their label
probabilities (DIR/fold{k}/oof/): together, DIR/oof.jsonl answers every training question out
of fold, and DIR/label_bias.yaml is the class-prior correction fitted on them (`medqa.priors`;
`test --config DIR/label_bias.yaml` applies it). Run again after a crash, it skips the folds
with a result and resumes an unfinished fold from its last checkpoint.
"""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from medqa import hints
from medqa.predictions import PredictionWriter
from medqa.results import write_json, write_result

FOLDS = range(10)


def fold_dir(cv_dir: Path, fold: int) -> Path:
    """Fold `fold`'s experiment: its runs, result and held-out answers."""
    return cv_dir / f"fold{fold}"


def fold_result(cv_dir: Path, fold: int) -> Path:
    return fold_dir(cv_dir, fold) / "result.json"


def oof_dir(cv_dir: Path, fold: int) -> Path:
    """Where fold `fold`'s dev questions are answered by its best checkpoint."""
    return fold_dir(cv_dir, fold) / "oof"


def out_of_fold(cv_dir: Path, labels: list[str]) -> dict[str, Any]:
    """Every fold's held-out answers in one file, CV_DIR/oof.jsonl, and the class-prior
    correction fitted on them, CV_DIR/label_bias.yaml (`medqa.priors`)."""
    from medqa.priors import fit_file

    files = [oof_dir(cv_dir, fold) / "predictions.jsonl" for fold in FOLDS]
    missing = [f.parent.parent.name for f in files if not f.is_file()]
    if missing:  # results of a medqa that wrote none
        print(f"Note: {', '.join(missing)} of {cv_dir} have no held-out predictions (fold{{k}}/oof/); remove "
              "those folds' result.json and run cv again to fit the class-prior correction.")
        return {}
    lines = [f.read_text() for f in files]
    oof = write_result(cv_dir / "oof.jsonl", "".join(lines), replace=True)  # cv's own file, rebuilt whole
    (cv_dir / "label_bias.yaml").unlink(missing_ok=True)
    return fit_file([oof], labels, cv_dir / "label_bias.yaml")


def run_fold(fit_args: list[str], cv_dir: Path, fold: int) -> dict[str, Any]:
    """Train on the nine other folds (resuming an unfinished run), score the best checkpoint
    on fold `fold`."""
    from medqa.checkpoints import FinishedRun, find_checkpoint
    from medqa.cli import main

    where = ["--data.fold", str(fold), "--trainer.logger.init_args.save_dir", str(cv_dir),
             "--trainer.logger.init_args.name", f"fold{fold}"]
    try:  # main() runs the fold's arguments alone, whatever this process's argv is
        cli = main(["fit", *fit_args, *where, "--ckpt_path", "last"], print_next=False)
    except FinishedRun:  # trained to the end, stopped before its result was written
        cli = None
    best = find_checkpoint(fold_dir(cv_dir, fold), "best")
    if best is None:
        raise RuntimeError(f"fold {fold}: the fit saved no best checkpoint (did it validate?) under {cv_dir / f'fold{fold}'}")
    if cli is None:
        cli = main(["validate", *fit_args, *where, "--ckpt_path", str(best)])
        metrics = dict(cli.trainer.callback_metrics)
    else:
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(best), verbose=False,
                                       weights_only=True)[0]
    result = {"fold": fold, "dev_acc": float(metrics["val/acc"]), "dev_macro_f1": float(metrics["val/macro_f1"]),
              "dev_questions": len(cli.datamodule.examples["dev"]), "checkpoint": str(best)}
    held_out = oof_dir(cv_dir, fold)
    for name in ("predictions.json", "predictions.jsonl"):  # left by a run stopped before its result
        (held_out / name).unlink(missing_ok=True)
    # The fold's dev questions answered by its best checkpoint, probabilities and all: with the
    # other folds', every training question answered by a model that did not train on it.
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
    writer.output_dir, cli.datamodule.predict_split = str(held_out), "dev"
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(best), weights_only=True,
                        return_predictions=False)
    del cli
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation of the folds' dev scores."""
    summary: dict[str, Any] = {"folds": results}
    for key in ("dev_acc", "dev_macro_f1"):
        values = [r[key] for r in results]
        summary[f"{key}_mean"] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["| fold | dev accuracy | dev macro-F1 |", "|---|---|---|"]
    lines += [f"| {r['fold']} | {r['dev_acc']:.4f} | {r['dev_macro_f1']:.4f} |" for r in summary["folds"]]
    lines.append(f"| mean ± std | {summary['dev_acc_mean']:.4f} ± {summary['dev_acc_std']:.4f} | "
                 f"{summary['dev_macro_f1_mean']:.4f} ± {summary['dev_macro_f1_std']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(argv or [])
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nFit arguments: see `python -m medqa fit --help`.")
        return {}
    cv_dir = Path("logs/cv")
    if "--cv_dir" in argv:
        i = argv.index("--cv_dir")
        if i + 1 >= len(argv):
            raise ValueError("--cv_dir needs a directory")
        cv_dir = Path(argv[i + 1])
        del argv[i : i + 2]
    for flag in ("--data.fold", "--ckpt_path", "--trainer.logger.init_args.save_dir", "--trainer.logger.init_args.name"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ValueError(f"{flag} is set by cv for each fold; leave it out (use --cv_dir for where runs go)")
    from medqa.cli import cli_for

    data = cli_for("fit", [*argv, "--data.fold", "0"])[0].datamodule  # built, not run: nothing written
    task = data.task
    if task.folds < len(FOLDS):
        raise ValueError(f"cv runs PubMedQA's {len(FOLDS)} official folds; {task.name} has one fixed dev set and "
                         "nothing to cross-validate: use fit, then test")
    cv_dir.mkdir(parents=True, exist_ok=True)

    results = []
    for fold in FOLDS:
        done = fold_result(cv_dir, fold)
        if done.is_file():
            result = json.loads(done.read_text())
            rank_zero_info(f"cv: fold {fold} already done (dev acc {result['dev_acc']:.4f}); skipped.")
        else:
            rank_zero_info(f"cv: fold {fold} of {len(FOLDS)}: training on the other nine folds.")
            result = run_fold(argv, cv_dir, fold)
            write_json(done, result, replace=True)  # a fold is either done, with its whole result, or not
        results.append(result)

    summary = summarize(results)
    summary["out_of_fold"] = out_of_fold(cv_dir, list(task.labels))
    write_json(cv_dir / "summary.json", summary, replace=True)
    table = format_summary(summary)
    write_result(cv_dir / "summary.md", table + "\n", replace=True)
    options = hints.run_options(argv)
    bias = cv_dir / "label_bias.yaml"
    print(f"\n10-fold cross-validation of {data.source} ({cv_dir}):\n\n{table}\n\n"
          f"Every training question answered out of fold: {cv_dir / 'oof.jsonl'}; the class-prior correction "
          f"fitted on them: {bias}.\n"
          "Next, train with the chosen settings (dev: fold 0) and score the test split, with the correction:\n"
          f"  {hints.medqa('fit', options)}\n  {hints.medqa('test', options, '--ckpt_path', 'best', '--config', str(bias))}")
    return summary
