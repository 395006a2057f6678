"""Benchmark: inference latency and throughput, ONNX Runtime vs PyTorch eager, and the
reduced-precision variants in ONNX Runtime (int8 static QDQ, kiln's shipped ``int8``; int8 dynamic; fp16), at
batch sizes 1, 64 and 1024.

A small CNN is trained on real MNIST digits (``kiln.data.mnist_5k``; a few seconds),
exported with ``kiln.export.export_onnx`` (parity gate included) and quantised with
``kiln.export.export_variants``. Every engine runs the full serving model (uint8 pixels
in, probabilities + label out) on CPU with the same thread count. For each batch size
each engine is warmed up, then timed ``--reps`` times (at least ``--min-seconds`` in
all); the median batch latency is reported and throughput = batch / median latency.
Accuracy of each engine on the held-out images is recorded beside.

    .venv/bin/python bench/inference.py               # -> bench/results/inference.json
    .venv/bin/python bench/inference.py --threads 1 --reps 50
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import onnxruntime as ort
    from helpers import clean_frame as clean_table

    from kiln.data import mnist_5k
    from kiln.export import export_onnx, export_variants
    from kiln.checkpoint import load_checkpoint
    from kiln.models import ServingModel
    from kiln.runtime import SessionSettings, create_session, run_contract
    from kiln.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    images, labels = mnist_5k()
    order = np.random.default_rng(0).permutation(len(labels))
    tr, va, te = order[:3000], order[3000:3500], order[3500:]
    train_df, val_df, test_df = (clean_table(images[i], labels[i]) for i in (tr, va, te))
    test_pixels, test_labels = images[te].astype(np.uint8), labels[te]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = TrainConfig(model="cnn", epochs=args.epochs, device="cpu")
        train(config, train_df, val_df, tmp / "m.pt", log=lambda _: None)
        export_onnx(tmp / "m.pt", tmp / "model.onnx", val_df, {})
        # max_drop=1.0 keeps every file to time it; whether each would ship (0.3 points) is recorded
        variants = export_variants(tmp / "model.onnx", tmp / "variants", test_df, max_drop=1.0,
                                   variants=("int8", "int8_dynamic", "fp16"), calibration_df=val_df)["variants"]
        for v in variants.values():
            v["ships"] = v["accuracy_drop"] <= 0.003

        # kiln's serving session settings with the benchmark's thread count: no spin-waiting
        # after a run, so idle ORT threads do not steal the cores from the next engine timed.
        session_settings = SessionSettings(device="cpu", intra_op_threads=args.threads)
        files = {"fp32": tmp / "model.onnx", "int8": variants["int8"]["path"],
                 "int8_dyn": variants["int8_dynamic"]["path"],
                 # fp16 is meant for GPU serving; on CPU, ONNX Runtime runs it as well as it can
                 "fp16": variants["fp16"]["path"]}
        sessions = {f"onnxruntime_{name}": create_session(Path(path), session_settings) for name, path in files.items()}
        _, net = load_checkpoint(tmp / "m.pt")
        serving = ServingModel(net).eval()

        def torch_run(batch: np.ndarray):
            with torch.inference_mode():
                return serving(torch.from_numpy(batch))

        engines = {
            "pytorch_eager": lambda b: torch_run(b)[1].numpy(),
            **{
                name: (lambda b, s=s: run_contract(s, b)[1])
                for name, s in sessions.items()
            },
        }
        accuracy = {
            name: float(np.mean(np.concatenate([fn(test_pixels[i : i + 1024]) for i in range(0, len(te), 1024)]) == test_labels))
            for name, fn in engines.items()
        }
        rows = []
        for batch_size in BATCHES:
            batch = np.ascontiguousarray(np.resize(test_pixels, (batch_size, 28, 28)))
            for name, fn in engines.items():
                times = _time(lambda: fn(batch), args.reps, args.min_seconds)
                median = statistics.median(times)
                rows.append({
                    "engine": name,
                    "batch_size": batch_size,
                    "median_ms": median * 1e3,
                    "p90_ms": float(np.percentile(times, 90)) * 1e3,
                    "images_per_s": batch_size / median,
                    "runs": len(times),
                })
        sizes = {"fp32_bytes": (tmp / "model.onnx").stat().st_size, "int8_bytes": variants["int8"]["bytes"],
                 "int8_dynamic_bytes": variants["int8_dynamic"]["bytes"], "fp16_bytes": variants["fp16"]["bytes"]}

    base = {(r["batch_size"]): r["median_ms"] for r in rows if r["engine"] == "pytorch_eager"}
    for r in rows:
        r["speedup_vs_pytorch"] = base[r["batch_size"]] / r["median_ms"]
    result = {
        "benchmark": "inference",
        "threads": args.threads,
        "session_settings": session_settings.model_dump(),
        "test_images": int(len(te)),
        "accuracy": accuracy,
        "variants": variants,
        "model_bytes": sizes,
        "rows": rows,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": "cpu",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'engine':<22}{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'images/s':>11}{'vs torch':>9}")
    for r in rows:
        print(f"{r['engine']:<22}{r['batch_size']:>6}{r['median_ms']:>11.3f}{r['p90_ms']:>9.3f}"
              f"{r['images_per_s']:>11.0f}{r['speedup_vs_pytorch']:>8.2f}x")
    print("accuracy on", len(te), "test images:", {k: round(v, 4) for k, v in accuracy.items()})
    for name, v in variants.items():
        print(f"{name}: drop {v['accuracy_drop'] * 100:+.2f} points, ships under the 0.3-point rule: {v['ships']}")
    print(f"model size: {sizes} -> {args.output}")


if __name__ == "__main__":
    main()
