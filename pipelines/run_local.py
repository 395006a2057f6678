"""Run the training pipeline on this machine through ``kfp.local``.

Each step runs as a subprocess of this Python (``SubprocessRunner(use_venv=False)``),
so the installed ``kiln`` package is what executes. Artifacts land under
``runs/<timestamp>/`` and a blessed model goes to ``model_store/``.

    kiln run [--data-rev v1] [--epochs 8] [--model-type cnn] ...
"""

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from pipelines.training_pipeline import DEFAULT_IMAGE, PIPELINE_NAME, build_pipeline


def parse_args(argv: list[str], repo_root: Path) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln run", description="Run the kiln pipeline locally (kfp.local).")
    p.add_argument("--data-repo", default=str(repo_root), help="DVC repository holding data/ (default: this checkout)")
    p.add_argument("--data-rev", default="", help="git revision of the data ('' = workspace, the default)")
    p.add_argument("--model-store", default=str(repo_root / "model_store"), help="model store root")
    p.add_argument("--model-name", default="mnist")
    p.add_argument("--model-type", default="cnn", choices=["cnn", "mlp"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize-wrong-size", action="store_true", help="resize wrong-size images instead of quarantining")
    p.add_argument("--min-accuracy", type=float, default=0.95)
    p.add_argument("--min-macro-recall", type=float, default=0.95)
    p.add_argument("--min-class-recall", type=float, default=0.85)
    p.add_argument("--runs-dir", default=str(repo_root / "runs"), help="where each run's artifacts go")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    """Run the pipeline once; return the run's pipeline root (its artifacts)."""
    from kfp import local

    run_root = Path(args.runs_dir).resolve() / dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_root))
    pipeline = build_pipeline(DEFAULT_IMAGE)
    pipeline(
        data_repo=str(Path(args.data_repo).resolve()) if Path(args.data_repo).exists() else args.data_repo,
        data_rev=args.data_rev,
        model_store=str(Path(args.model_store).resolve()),
        model_name=args.model_name,
        model_type=args.model_type,
        epochs=args.epochs,
        seed=args.seed,
        resize_wrong_size=args.resize_wrong_size,
        min_accuracy=args.min_accuracy,
        min_macro_recall=args.min_macro_recall,
        min_class_recall=args.min_class_recall,
    )
    return run_root


def find_output(run_root: Path, task: str, output: str) -> Path | None:
    """The file of ``task``'s ``output`` artifact under a local run's root, if it exists."""
    hits = sorted(run_root.glob(f"{PIPELINE_NAME}-*/{task}/{output}"))
    return hits[-1] if hits else None


def summarize(run_root: Path, args: argparse.Namespace) -> dict:
    """Where the run's model, metrics and reports are, and what was deployed."""
    from kiln.store import ModelStore

    metrics_file = find_output(run_root, "evaluate", "metrics")
    executor_outputs = sorted(run_root.glob(f"{PIPELINE_NAME}-*/evaluate/executor_output.json"))
    metrics = {}
    if executor_outputs:
        artifacts = json.loads(executor_outputs[-1].read_text()).get("artifacts", {})
        for artifact in artifacts.get("metrics", {}).get("artifacts", []):
            metrics = artifact.get("metadata", {})
    production = ModelStore(args.model_store).production(args.model_name)
    return {
        "run": str(run_root),
        "validation_report": str(find_output(run_root, "validate", "report")),
        "quarantine": str(find_output(run_root, "clean", "quarantine")),
        "onnx_model": str(find_output(run_root, "export", "onnx_model")),
        "metrics_file": str(metrics_file),
        "test_metrics": metrics,
        "production": None if production is None else {"version": production.version, "path": str(production.onnx_path)},
    }


def main(argv: list[str], repo_root: Path) -> int:
    args = parse_args(argv, repo_root)
    run_root = run(args)
    summary = summarize(run_root, args)
    print("\n== kiln run ==")
    print(f"artifacts:          {summary['run']}")
    print(f"validation report:  {summary['validation_report']}")
    print(f"quarantine list:    {summary['quarantine']}")
    print(f"ONNX model:         {summary['onnx_model']}")
    for name, value in sorted(summary["test_metrics"].items()):
        print(f"test {name:<14} {value:.4f}" if isinstance(value, float) else f"test {name:<14} {value}")
    if summary["production"]:
        print(f"production model:   version {summary['production']['version']} at {summary['production']['path']}")
    else:
        print("production model:   none (nothing deployed)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], Path(__file__).resolve().parents[1]))
