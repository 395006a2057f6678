"""Run the training pipeline on this machine through ``kfp.local``.

Each step runs as a subprocess of this Python (``SubprocessRunner(use_venv=False)``),
so the installed ``kiln`` package is what executes. Artifacts land under
``runs/<timestamp>/`` and a blessed model goes to ``model_store/``.

Runs share kfp.local's cache (``runs/.kfp_cache``): a run on unchanged data and code
reuses the earlier run's steps up to training and export, and only resolve, drift,
evaluate and deploy run again. The "image" string, which is part of the cache key,
carries a hash of the kiln source (``kiln.version.local_image``).

    kiln run [--data-rev v1] [--epochs 8] [--model-type cnn] [--no-cache] ...
"""

import argparse
import datetime as dt
import io
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import TextIO

from kiln.errors import ArgumentParser, DataError, StepFailedError, UsageError
from kiln.version import local_image
from pipelines.local_console import StepView, capture, console_stream
from pipelines.training_pipeline import DEFAULT_IMAGE, PIPELINE_NAME, UNCACHED, build_pipeline

LOG_FILE = "kiln-run.log"
# What to do when a step fails, beyond its own error (which says what is wrong).
STEP_HINTS = {
    "resolve": "check --data-repo and --data-rev",
    "ingest": "check that the data's DVC remote is reachable and its credentials (`dvc pull` in that repository "
              "shows the same error)",
    "validate": "the validation report in the step's folder lists the failed expectations",
}


def parse_args(argv: list[str], repo_root: Path) -> argparse.Namespace:
    p = ArgumentParser(prog="kiln run", description="Run the kiln pipeline locally (kfp.local).")
    p.add_argument("--data-repo", default=str(repo_root), help="DVC repository holding data/ (default: this checkout)")
    p.add_argument("--data-rev", default="", help="git revision of the data ('' = workspace, the default)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run on a workspace whose data/ differs from data.dvc (recorded as a '+dirty' version)")
    p.add_argument("-v", "--verbose", action="store_true", help="stream every step's full log (always in the run's "
                   f"{LOG_FILE})")
    p.add_argument("--model-store", default=str(repo_root / "model_store"), help="model store root")
    p.add_argument("--model-name", default="mnist")
    p.add_argument("--model-type", default="cnn", choices=["cnn", "mlp"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize-wrong-size", action="store_true", help="resize wrong-size images instead of quarantining")
    p.add_argument("--drift-action", default="warn", choices=["warn", "fail"],
                   help="what data drift from the production model's data does (default: warn)")
    p.add_argument("--min-accuracy", type=float, default=0.95)
    p.add_argument("--min-macro-recall", type=float, default=0.95)
    p.add_argument("--min-class-recall", type=float, default=0.85)
    p.add_argument("--champion-tolerance", type=float, default=0.005)
    p.add_argument("--runs-dir", default=str(repo_root / "runs"), help="where each run's artifacts go")
    p.add_argument("--cache-root", help="kfp.local's task cache (default: <runs-dir>/.kfp_cache)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="run every step, even those whose inputs and code are unchanged")
    return p.parse_args(argv)


def run(args: argparse.Namespace, console: TextIO | None = None) -> Path:
    """Run the pipeline once; return the run's pipeline root (its artifacts).

    With ``console``, everything the steps and kfp.local write goes to the run's
    ``kiln-run.log`` and ``console`` shows one line per step (all of it with ``-v``); a
    failed step raises :class:`StepFailedError` with the step's own error.
    """
    from kfp import local

    # SubprocessRunner warns that the kiln image is not a Python base image; locally that
    # is the point: this venv *is* the image's environment (same package, same pins).
    warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
    run_root = Path(args.runs_dir).resolve() / dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    cache_root = Path(args.cache_root or Path(args.runs_dir) / ".kfp_cache").resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_root),
               enable_caching=args.cache, cache_root=str(cache_root))
    pipeline = build_pipeline(local_image(DEFAULT_IMAGE))
    try:
        if console is None:
            _run_pipeline(pipeline, args)
        else:
            _run_with_console(pipeline, args, run_root, console)
    finally:
        write_metadata_only_artifacts(run_root)
    return run_root


def _run_with_console(pipeline, args: argparse.Namespace, run_root: Path, console: TextIO) -> None:
    log_path = run_root / LOG_FILE
    verbose = getattr(args, "verbose", False)
    view = StepView(io.StringIO() if verbose else console, uncached=UNCACHED, caching=args.cache)
    if not verbose:
        console.write(f"kiln run: steps' logs in {log_path} (-v streams them)\n")
    failure = None
    with capture(log_path, view.feed, echo=console if verbose else None):
        try:
            _run_pipeline(pipeline, args)
        except RuntimeError as e:  # kfp.local's "Pipeline ... finished with status FAILURE"
            failure = e
        finally:
            view.close()
    if failure is not None:
        step, error = next(iter(view.failed.items()), ("?", None))
        hint = STEP_HINTS.get(step, "")
        raise StepFailedError(step, (error or str(failure)) + (f"; {hint}" if hint else ""), str(log_path)) from failure


def write_metadata_only_artifacts(run_root: Path) -> list[Path]:
    """Give every output artifact that is only metadata (a ``Metrics`` filled by
    ``log_metric``) a file: its metadata as JSON at its URI.

    kfp.local's cache treats an entry whose local artifact file is missing as a miss, so
    without this a step with metrics (validate, train) would never be served from cache.
    """
    written = []
    for output in run_root.glob(f"{PIPELINE_NAME}-*/*/executor_output.json"):
        for entry in json.loads(output.read_text()).get("artifacts", {}).values():
            for artifact in entry.get("artifacts", []):
                uri = Path(artifact.get("uri", ""))
                if uri.is_absolute() and not uri.exists() and uri.parent.is_dir():
                    uri.write_text(json.dumps(artifact.get("metadata", {}), indent=1, sort_keys=True))
                    written.append(uri)
    return written


def _run_pipeline(pipeline, args: argparse.Namespace) -> None:
    pipeline(
        data_repo=str(Path(args.data_repo).resolve()) if Path(args.data_repo).exists() else args.data_repo,
        data_rev=args.data_rev,
        model_store=str(Path(args.model_store).resolve()),
        model_name=args.model_name,
        model_type=args.model_type,
        epochs=args.epochs,
        seed=args.seed,
        resize_wrong_size=args.resize_wrong_size,
        drift_action=args.drift_action,
        min_accuracy=args.min_accuracy,
        min_macro_recall=args.min_macro_recall,
        min_class_recall=args.min_class_recall,
        champion_tolerance=args.champion_tolerance,
    )


def task_dir(run_root: Path, task: str) -> Path | None:
    """The folder of ``task`` under a local run's root (None if the task never ran)."""
    hits = sorted(run_root.glob(f"{PIPELINE_NAME}-*/{task}"))
    return hits[-1] if hits else None


def executor_output(run_root: Path, task: str) -> dict:
    """What a finished task reported (parameters and artifact metadata), or {}."""
    folder = task_dir(run_root, task)
    path = folder / "executor_output.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def summarize(run_root: Path) -> dict:
    """Where the run's reports and model are, its test metrics, verdict and deployed version."""
    evaluate = executor_output(run_root, "evaluate")
    metrics = {}
    for artifact in evaluate.get("artifacts", {}).get("metrics", {}).get("artifacts", []):
        metrics = artifact.get("metadata", {})
    deploy = executor_output(run_root, "deploy").get("parameterValues", {})

    def path(task: str, output: str) -> str:
        folder = task_dir(run_root, task)
        if folder and (folder / output).exists():
            return str(folder / output)
        return "(not produced)" if task in UNCACHED or not evaluate else "(from cache: an earlier run's)"

    return {
        "run": str(run_root),
        "validation_report": path("validate", "report"),
        "drift_report": path("drift", "report"),
        "quarantine": path("clean", "quarantine"),
        "training_curves": path("train", "curves_plot"),
        "onnx_model": path("export", "onnx_model"),
        "variants": path("export", "variants"),
        "evaluation_report": path("evaluate", "report"),
        "verdict": path("evaluate", "verdict"),
        "test_metrics": metrics,
        "blessed": evaluate.get("parameterValues", {}).get("Output"),
        "deployed_version": deploy.get("version"),
        "version_added": deploy.get("added"),
        "ran": sorted(p.name for p in run_root.glob(f"{PIPELINE_NAME}-*/*") if p.is_dir()),
    }


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before anything runs, parameter values no step can use and data that is
    not what the user thinks: a revision that does not exist, or a workspace whose
    ``data/`` differs from ``data.dvc`` (unless ``--allow-dirty``)."""
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    for name in ("min_accuracy", "min_macro_recall", "min_class_recall"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    if args.champion_tolerance < 0:
        raise UsageError(f"--champion-tolerance must be at least 0, got {args.champion_tolerance}")
    if not Path(args.data_repo).is_dir():
        return  # a git URL: the resolve step reports what is wrong with it
    from kiln.ingest import IngestError, resolve

    ingest_log = logging.getLogger("kiln.ingest")
    saved_level = ingest_log.level
    ingest_log.setLevel(logging.ERROR)  # its "recording as dirty" warning: refused below instead
    try:
        resolved = resolve(str(Path(args.data_repo).resolve()), args.data_rev)
    except IngestError as e:
        hint = ("pass --data-rev a tag, branch or commit of that repository (`git tag` lists the tags)"
                if args.data_rev else "run `kiln data bootstrap` or `dvc pull`")
        raise DataError(f"{e}; {hint}") from e
    finally:
        ingest_log.setLevel(saved_level)
    if "+dirty." in resolved.data_version and not args.allow_dirty:
        raise DataError(f"data/ in {args.data_repo} differs from data.dvc (changed without `dvc add`): run "
                        "`dvc add data` to record the change as a new data version, `dvc checkout data` to undo "
                        "it, or pass --allow-dirty")


def print_summary(summary: dict, args: argparse.Namespace, out: TextIO) -> None:
    """The run's outcome in a few lines; the run report's path, when there is one, last."""
    def line(label: str, value: object) -> None:
        out.write(f"{label + ':':<20} {value}\n")

    out.write("\n")
    line("artifacts", summary["run"])
    for label, key in (("validation report", "validation_report"), ("drift report", "drift_report"),
                       ("quarantine list", "quarantine"), ("training curves", "training_curves"),
                       ("ONNX model", "onnx_model"), ("int8/fp16 variants", "variants"),
                       ("evaluation report", "evaluation_report"), ("verdict", "verdict")):
        line(label, summary[key])
    metrics = summary["test_metrics"]
    shown = [f"{name} {metrics[name]:.4f}" for name in ("accuracy", "precision_macro", "recall_macro", "f1_macro")
             if name in metrics]
    if shown:
        line("test metrics", ", ".join(shown))
    if summary["deployed_version"] and not summary["version_added"]:
        line("deployed", f"nothing new: version {summary['deployed_version']} is the same model and is production")
    elif summary["deployed_version"]:
        store = Path(args.model_store) / args.model_name / summary["deployed_version"]
        line("deployed", f"version {summary['deployed_version']} is production ({store})")
    else:
        line("deployed", "nothing (not blessed); the production alias did not move")
    if summary.get("report"):
        line("run report", summary["report"])
    out.flush()


def main(argv: list[str], repo_root: Path) -> int:
    args = parse_args(argv, repo_root)
    check_args(args)
    console = console_stream()
    try:
        run_root = run(args, console=console)
        print_summary(summarize(run_root), args, console)
    finally:
        if console is not sys.stdout:
            console.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], Path(__file__).resolve().parents[1]))
