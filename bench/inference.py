"""Benchmark: inference latency and throughput, ONNX Runtime vs PyTorch eager, and the
reduced-precision variants in ONNX Runtime (int8 static QDQ, kiln's shipped ``int8``; int8
dynamic; fp16), for every network family of ``kiln.models`` (cnn, mlp, gru, transformer).

For each family a model is trained on real MNIST digits (``kiln.data.mnist_5k``; seconds
to a minute or two on CPU), exported with ``kiln.export.export_onnx`` (parity gate
included) and quantised with ``kiln.export.export_variants``. Every engine runs the full
serving model (uint8 pixels in, probabilities + label out) on CPU with the same thread
count. For each batch size each engine is warmed up, then timed ``--reps`` times (at least
``--min-seconds`` in all); the median batch latency is reported and throughput = batch /
median latency. Accuracy of each engine on the held-out images is recorded beside, and
whether each variant would ship under kiln's 0.3-point rule.

    .venv/bin/python bench/inference.py               # -> bench/results/inference.json
    .venv/bin/python bench/inference.py --threads 1 --reps 50 --families cnn gru
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
BATCHES = (1, 64, 1024)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _time(fn, reps: int, min_seconds: float) -> list[float]:
    for _ in range(3):
        fn()  # warm-up
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < reps or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 20 * reps:
            break
    return times


def _parse_args() -> argparse.Namespace:
    from kiln.models import MODEL_TYPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of each family's model")
    parser.add_argument("--families", nargs="+", default=list(MODEL_TYPES), choices=MODEL_TYPES)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args()


def _build(family: str, args: argparse.Namespace, tables: tuple, tmp: Path) -> tuple[dict, float, dict]:
    """Train and export one family; (its TrainConfig dict, training seconds, variants report)."""
    from kiln.export import MAX_VARIANT_ACCURACY_DROP, export_onnx, export_variants
    from kiln.train import TrainConfig, train

    train_df, val_df, test_df = tables
    config = TrainConfig(model=family, epochs=args.epochs, device="cpu")
    started = time.perf_counter()
    train(config, train_df, val_df, tmp / "m.pt", log=lambda _: None)
    train_seconds = time.perf_counter() - started
    export_onnx(tmp / "m.pt", tmp / "model.onnx", val_df, {})
    # max_drop=1.0 keeps every file to time it; whether each would ship (0.3 points) is recorded
    variants = export_variants(tmp / "model.onnx", tmp / "variants", test_df, max_drop=1.0,
                               variants=("int8", "int8_dynamic", "fp16"), calibration_df=val_df)["variants"]
    for v in variants.values():
        if v["accuracy_drop"] is None:  # the variant failed to build: its reason says why
            continue
        v["ships"] = v["accuracy_drop"] <= MAX_VARIANT_ACCURACY_DROP + 1e-12
        v["reason"] = (f"accuracy drop {v['accuracy_drop'] * 100:.2f} points "
                       f"{'<=' if v['ships'] else '>'} {MAX_VARIANT_ACCURACY_DROP * 100:.2f}")
    return config.to_dict(), train_seconds, variants


def _rows(family: str, engines: dict, pixels: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Median and p90 latency of every engine at every batch size, relative to PyTorch eager."""
    rows = []
    for batch_size in args.batches:
        batch = np.ascontiguousarray(np.resize(pixels, (batch_size, 28, 28)))
        for name, fn in engines.items():
            times = _time(lambda: fn(batch), args.reps, args.min_seconds)
            median = statistics.median(times)
            rows.append({"family": family, "engine": name, "batch_size": batch_size, "median_ms": median * 1e3,
                         "p90_ms": float(np.percentile(times, 90)) * 1e3, "images_per_s": batch_size / median,
                         "runs": len(times)})
    base = {r["batch_size"]: r["median_ms"] for r in rows if r["engine"] == "pytorch_eager"}
    for r in rows:
        r["speedup_vs_pytorch"] = base[r["batch_size"]] / r["median_ms"]
    return rows


def bench_family(family: str, args: argparse.Namespace, tables: tuple, test: tuple[np.ndarray, np.ndarray],
                 tmp: Path) -> dict:
    """Train, export and time one family; its accuracy, variants, sizes and timing rows."""
    from kiln.checkpoint import load_checkpoint
    from kiln.models import ServingModel
    from kiln.runtime import SessionSettings, create_session, run_contract

    tmp = tmp / family
    config, train_seconds, variants = _build(family, args, tables, tmp)
    # kiln's serving session settings with the benchmark's thread count: no spin-waiting
    # after a run, so idle ORT threads do not steal the cores from the next engine timed.
    session_settings = SessionSettings(device="cpu", intra_op_threads=args.threads)
    files = {"fp32": tmp / "model.onnx", "int8": variants["int8"]["path"],
             "int8_dyn": variants["int8_dynamic"]["path"],
             # fp16 is meant for GPU serving; on CPU, ONNX Runtime runs it as well as it can
             "fp16": variants["fp16"]["path"]}
    sessions = {f"onnxruntime_{name}": create_session(Path(path), session_settings)
                for name, path in files.items() if path}
    serving = ServingModel(load_checkpoint(tmp / "m.pt")[1]).eval()

    def torch_labels(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return serving(torch.from_numpy(batch))[1].numpy()

    engines = {"pytorch_eager": torch_labels,
               **{name: (lambda b, s=s: run_contract(s, b)[1]) for name, s in sessions.items()}}
    pixels, labels = test
    accuracy = {name: float(np.mean(np.concatenate([fn(pixels[i: i + 1024]) for i in range(0, len(labels), 1024)])
                                    == labels))
                for name, fn in engines.items()}
    sizes = {"fp32_bytes": (tmp / "model.onnx").stat().st_size,
             **{f"{name}_bytes": v["bytes"] for name, v in variants.items()}}
    return {"train_config": config, "train_seconds": train_seconds, "accuracy": accuracy, "variants": variants,
            "model_bytes": sizes, "session_settings": session_settings.model_dump(),
            "rows": _rows(family, engines, pixels, args)}


def main() -> None:
    args = _parse_args()
    import onnxruntime as ort
    from helpers import clean_frame as clean_table

    from kiln.data import mnist_5k

    torch.set_num_threads(args.threads)
    images, labels = mnist_5k()
    order = np.random.default_rng(0).permutation(len(labels))
    tr, va, te = order[:3000], order[3000:3500], order[3500:]
    tables = tuple(clean_table(images[i], labels[i]) for i in (tr, va, te))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        families = {family: bench_family(family, args, tables, (images[te].astype(np.uint8), labels[te]), Path(tmp))
                    for family in args.families}
    result = {
        "benchmark": "inference",
        "threads": args.threads,
        "reps": args.reps,
        "min_seconds": args.min_seconds,
        "epochs": args.epochs,
        "test_images": int(len(te)),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "cpu_count": os.cpu_count(),
        "families": {name: {k: v for k, v in f.items() if k != "rows"} for name, f in families.items()},
        "rows": [r for f in families.values() for r in f["rows"]],
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": "cpu",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'family':<12}{'engine':<22}{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'images/s':>11}{'vs torch':>9}")
    for r in result["rows"]:
        print(f"{r['family']:<12}{r['engine']:<22}{r['batch_size']:>6}{r['median_ms']:>11.3f}{r['p90_ms']:>9.3f}"
              f"{r['images_per_s']:>11.0f}{r['speedup_vs_pytorch']:>8.2f}x")
    for name, f in families.items():
        print(f"{name}: accuracy on {len(te)} test images {({k: round(v, 4) for k, v in f['accuracy'].items()})}")
        for variant, v in f["variants"].items():
            print(f"  {variant}: {v['reason']}, ships under the 0.3-point rule: {v['ships']}")
    print(f"load average before/after: {load_before} / {os.getloadavg()} -> {args.output}")


if __name__ == "__main__":
    main()
