"""The GPU path, end to end on one NVIDIA GPU (under 3 minutes): one epoch of CUDA
training under bf16 autocast, ONNX export, then ONNX Runtime's CUDA provider against its
CPU provider on the test split (labels identical, probabilities within 1e-3).

    make gpu-check                       # -> bench/results/gpu_check.json
    .venv/bin/python bench/gpu_check.py --out /tmp/gpu_check.json

Needs CUDA torch and onnxruntime-gpu with its CUDA libraries (the train image, or a venv
with `.[pipeline,serve-gpu,cuda]` from a CUDA torch index). Where no CUDA GPU is visible
it exits 2 with one line saying so, and writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
PROB_ATOL = 1e-3


def cuda_problem() -> str | None:
    """Why the GPU path cannot run here, or None when torch and ORT both see CUDA."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


def clean_tables() -> dict[str, pd.DataFrame]:
    """kiln's clean tables of the 5,000 bundled MNIST digits, split as the pipeline splits."""
    from kiln.data import mnist_5k
    from kiln.split import assign_splits

    images, labels = mnist_5k()
    pixels = [np.ascontiguousarray(image, dtype=np.uint8).tobytes() for image in images]
    clean = pd.DataFrame({"id": [f"{i:05d}" for i in range(len(pixels))], "label": labels.astype(np.int64),
                          "pixels": pixels, "sha256": [hashlib.sha256(p).hexdigest() for p in pixels]})
    split = assign_splits(clean)
    return {name: clean[split == name].reset_index(drop=True) for name in ("train", "val", "test")}


def ort_outputs(onnx_path: Path, providers: list[str], pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    import onnxruntime as ort

    from kiln.contract import INPUT_NAME, LABEL_NAME, PROBABILITIES_NAME

    session = ort.InferenceSession(str(onnx_path), providers=providers)
    probs, labels = session.run([PROBABILITIES_NAME, LABEL_NAME], {INPUT_NAME: pixels})
    return probs, labels, session.get_providers()[0]


def run(out: Path, device: str = "cuda", provider: str = "CUDAExecutionProvider") -> dict:
    """Train, export and compare; ``device``/``provider`` other than CUDA only to smoke-test
    this script on a machine without a GPU (the record then says passed: false)."""
    import onnxruntime as ort
    import torch

    from kiln.dataset import to_arrays
    from kiln.export import export_onnx
    from kiln.train import TrainConfig, train

    started = time.perf_counter()
    tables = clean_tables()
    config = TrainConfig(epochs=1, amp=True, device=device)
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        result = train(config, tables["train"], tables["val"], Path(tmp) / "model.pt")
        onnx_path = Path(tmp) / "model.onnx"
        report = export_onnx(result.checkpoint_path, onnx_path, tables["test"], {"data_version": "gpu-check"})
        pixels, _ = to_arrays(tables["test"])
        cpu_probs, cpu_labels, cpu_provider = ort_outputs(onnx_path, ["CPUExecutionProvider"], pixels)
        gpu_probs, gpu_labels, gpu_provider = ort_outputs(onnx_path, [provider], pixels)
    max_diff = float(np.abs(cpu_probs - gpu_probs).max())
    disagreements = int((cpu_labels != gpu_labels).sum())
    record = {
        "passed": gpu_provider == "CUDAExecutionProvider" and disagreements == 0 and max_diff <= PROB_ATOL,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "torch": torch.__version__, "cuda": torch.version.cuda,
        "onnxruntime": ort.__version__, "python": platform.python_version(),
        "train": {"device": result.device, "bf16_autocast": config.amp, "epochs": result.epochs_run,
                  "seconds": round(result.seconds, 2), "val_accuracy": result.best_val_accuracy,
                  "n_train": len(tables["train"]), "n_val": len(tables["val"])},
        "export": report.to_dict(),
        "ort_cuda_vs_cpu": {"n_test": len(pixels), "providers": [gpu_provider, cpu_provider],
                            "label_disagreements": disagreements, "max_abs_prob_diff": max_diff, "atol": PROB_ATOL},
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu-check: skipped, {problem}; run it on a machine with one NVIDIA GPU", file=sys.stderr)
        return 2
    record = run(args.out)
    print(f"gpu-check: {'PASSED' if record['passed'] else 'FAILED'} on {record['gpu']} in {record['total_seconds']} s "
          f"(ORT CUDA vs CPU: {record['ort_cuda_vs_cpu']['label_disagreements']} label differences, "
          f"max |dp| {record['ort_cuda_vs_cpu']['max_abs_prob_diff']:.2e}) -> {args.out}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
