"""Benchmark: kiln's trainer vs a minimal plain PyTorch loop, same model, same data, same run.

Both train the same architecture (``--model``, default cnn) for the same number of
epochs on the same clean table built from the real MNIST digits (``kiln.data.mnist_5k``),
same batch size, AdamW + one-cycle, random shift + rotation augmentation. The plain loop is what
one would write by hand: no validation pass, no checkpointing, no early stopping, no
determinism switch. kiln's time is ``TrainResult.seconds`` (the whole ``train()`` call:
tensor conversion, validation every epoch, checkpoint write included), so the ratio is
conservative; ``TrainResult.loop_seconds`` (the optimisation steps alone, what the
plain loop times) gives the like-for-like ratio. Each side runs ``--repeats`` times alternately and the best time counts
(noise on a shared machine only ever slows a run down).

    .venv/bin/python bench/train.py                  # -> bench/results/train.json
    .venv/bin/python bench/train.py --epochs 3 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _tables(n_train: int, n_val: int):
    from helpers import clean_frame as clean_table  # the test helper that builds clean tables

    from kiln.data import mnist_5k

    images, labels = mnist_5k()
    order = np.random.default_rng(0).permutation(len(labels))
    tr, va = order[:n_train], order[n_train : n_train + n_val]
    return clean_table(images[tr], labels[tr]), clean_table(images[va], labels[va])


def plain_loop(config, train_df) -> float:
    """A minimal hand-written loop; returns seconds for the training epochs."""
    from kiln.dataset import to_arrays
    from kiln.augment import random_rotate, random_shift
    from kiln.models import Preprocess, build_model

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    pixels, labels = to_arrays(train_df)
    x_all, y_all = torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy())
    started = time.perf_counter()
    model, preprocess = build_model(config), Preprocess()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(len(y_all) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=config.epochs * steps)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(y_all), generator=generator)
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            x = preprocess(random_rotate(random_shift(x_all[idx], config.max_shift, generator), config.max_rotation, generator))
            loss = F.cross_entropy(model(x), y_all[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    from kiln.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    train_df, val_df = _tables(args.n_train, args.n_val)
    # patience=0: no early stop, so both sides run exactly `epochs` epochs
    config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, device="cpu", patience=0)
    kiln_s, kiln_loop_s, plain_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            plain_s.append(plain_loop(config, train_df))
            result = train(config, train_df, val_df, Path(tmp) / "m.pt", log=lambda _: None)
            kiln_s.append(result.seconds)
            kiln_loop_s.append(result.loop_seconds)
    samples = args.n_train * args.epochs
    kiln_sps, plain_sps = samples / min(kiln_s), samples / min(plain_s)
    kiln_loop_sps = samples / min(kiln_loop_s)
    result = {
        "benchmark": "train",
        "model": args.model,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "kiln_seconds": kiln_s,
        "plain_seconds": plain_s,
        "kiln_loop_seconds": kiln_loop_s,
        "kiln_samples_per_s": kiln_sps,
        "kiln_loop_samples_per_s": kiln_loop_sps,
        "plain_samples_per_s": plain_sps,
        "ratio_kiln_over_plain": kiln_sps / plain_sps,
        "ratio_kiln_loop_over_plain": kiln_loop_sps / plain_sps,
        "target_ratio": 0.95,
        "meets_target_loop": kiln_loop_sps / plain_sps >= 0.95,
        "meets_target_end_to_end": kiln_sps / plain_sps >= 0.95,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": "cpu",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'trainer':<10}{'best s':>10}{'samples/s':>12}")
    print(f"{'kiln':<10}{min(kiln_s):>10.2f}{kiln_sps:>12.0f}   (whole train(): data, validation, checkpoint)")
    print(f"{'kiln loop':<10}{min(kiln_loop_s):>10.2f}{kiln_loop_sps:>12.0f}   (optimisation steps only)")
    print(f"{'plain':<10}{min(plain_s):>10.2f}{plain_sps:>12.0f}")
    print(f"ratio kiln loop/plain = {result['ratio_kiln_loop_over_plain']:.3f}, whole train()/plain = "
          f"{result['ratio_kiln_over_plain']:.3f} (target >= 0.95) -> {args.output}")


if __name__ == "__main__":
    main()
