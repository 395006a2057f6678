"""Train a digit classifier on clean tables and keep the best checkpoint.

The loop (:func:`train` -> :func:`_fit`) reads top to bottom: one epoch of
optimisation steps, a validation pass, bookkeeping of the best epoch, a checkpoint, an
early-stopping test. Device choice, determinism, DDP, AMP, resuming and checkpointing
are small named helpers around it. The networks live in :mod:`kiln.models`, the
checkpoint format and I/O in :mod:`kiln.checkpoint`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import kiln
from kiln import progress
from kiln.checkpoint import read_checkpoint, read_resume_state, save_atomically, weights_sha256
from kiln.augment import random_rotate, random_shift
from kiln.contract import IMAGE_SIZE, NUM_CLASSES
from kiln.dataset import CLEAN_COLUMNS, read_table, to_arrays
from kiln.distributed import Dist, deterministic, launch, rank_device, rank_slice, setup_distributed, sync_epoch
from kiln.models import MODEL_TYPES, Preprocess, build_model

MODELS = MODEL_TYPES
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Saved verbatim in the checkpoint."""

    model: str = "cnn"
    """Network family, a key of :data:`kiln.models.FAMILIES`: ``"cnn"`` (two conv
    blocks + MLP head) or ``"mlp"`` (784-512-10)."""

    epochs: int = 10
    """Maximum passes over the training table; early stopping may end sooner."""

    batch_size: int = 64
    """Training minibatch size."""

    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""

    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""

    dropout: float = 0.25
    """Dropout before the classifier's last layer (0 disables)."""

    max_shift: int = 2
    """Training augmentation: each image is shifted by a random whole number of pixels
    in [-max_shift, max_shift] on each axis, padding with zeros (0 disables). With only
    a few thousand digits this is worth about half a point of test accuracy."""

    max_rotation: float = 10.0
    """Training augmentation: each image is also rotated by a random angle in
    [-max_rotation, max_rotation] degrees about its centre (bilinear, on the training
    device; 0 disables)."""

    amp: bool = True
    """On CUDA, run the training forward pass under bf16 autocast (weights, optimiser
    and validation stay float32). Ignored on CPU."""

    patience: int = 3
    """Stop after this many epochs without a new best validation loss."""

    seed: int = 0
    """Seeds weight init, shuffling, augmentation and dropout. Same seed, same data and
    same device (and, on CPU, same thread count) give the same run."""

    device: str = "auto"
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``."""

    eval_batch_size: int = 256
    """Batch size for validation passes; only affects speed and memory (on CPU a batch
    whose activations stay in cache beats a larger one)."""

    def __post_init__(self) -> None:
        def bad(name: str, requirement: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {requirement}, got {getattr(self, name)!r}")

        for name, choices in (("model", MODELS), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"one of {choices}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("patience", 0), ("max_shift", 0),
                          ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, "a positive int" if low else "a non-negative int")
        for name in ("lr", "weight_decay", "dropout", "max_rotation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite number")
        for name, ok, requirement in (
            ("max_shift", self.max_shift < IMAGE_SIZE, f"< {IMAGE_SIZE}"), ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("max_rotation", 0 <= self.max_rotation <= 45, "in [0, 45] degrees"), ("amp", isinstance(self.amp, bool), "a bool"),
        ):
            if not ok:
                raise bad(name, requirement)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-safe dict; ``from_dict(to_dict())`` gives an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a mapping of field names.

        Missing fields take their defaults (so pipeline parameters can name only what
        they change); unknown fields raise ``ValueError`` rather than being ignored,
        because a misspelt hyperparameter silently falling back to its default is the
        kind of bug nobody notices. Values are validated as in the constructor.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))


@dataclass
class TrainResult:
    """What :func:`train` did. ``history`` has one dict per epoch run:
    ``{"epoch", "train_loss", "val_loss", "val_accuracy", "lr"}`` (epochs count from 1)."""

    best_val_loss: float
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    seconds: float
    device: str
    checkpoint_path: Path
    world_size: int = 1
    """Processes that trained together (torch.distributed); 1 for a plain run."""
    weights_sha256: str = ""
    """sha256 over the best epoch's weights (names, dtypes, shapes, bytes), so runs and
    distributed ranks can be compared without loading checkpoints."""
    loop_seconds: float = 0.0
    """Time spent in the optimisation steps alone (augmentation, forward, backward,
    optimiser), excluding data conversion, validation and checkpointing; the figure
    to compare with a bare training loop."""
    resumed_from_epoch: int = 0
    """The last epoch already done in the checkpoint this run resumed from (0: fresh)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (paths as strings)."""
        d = dataclasses.asdict(self)
        d["checkpoint_path"] = str(self.checkpoint_path)
        return d


# --------------------------------------------------------------------------- data


@torch.no_grad()
def _evaluate(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on a whole table, in eval mode."""
    model.eval()
    preprocess = Preprocess()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = pixels[start : start + batch_size], labels[start : start + batch_size]
        logits = model(preprocess(x))
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum().item())
    return total_loss / len(labels), correct / len(labels)


def _table_tensors(df: pd.DataFrame, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean table -> (uint8 [N, 28, 28], int64 [N]) on ``device``, checking labels."""
    if len(df) == 0:
        raise ValueError(f"{name} table is empty")
    pixels, labels = to_arrays(df)
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{name} table has labels outside [0, {NUM_CLASSES}): {sorted(set(labels.tolist()))}")
    # np.frombuffer gives a read-only view; torch wants a writable array
    x, y = torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy())
    if device.type == "cuda":  # page-locked host memory: a faster, asynchronous copy to the GPU
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """Everything one run updates: the network (and its DDP wrapper), optimiser,
    schedule, RNG, history and the best epoch so far."""

    config: TrainConfig
    net: nn.Module
    model: nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: torch.autocast
    generator: torch.Generator
    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_acc: float = 0.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    last_epoch: int = 0
    stopped: bool = False
    loop_seconds: float = 0.0
    resumed_from_epoch: int = 0


def _new_run(config: TrainConfig, device: torch.device, ddp: Dist, steps_per_epoch: int) -> _Run:
    """Seeded network, optimiser (AdamW), one-cycle schedule and bf16 autocast (CUDA only)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # shuffling + augmentation
    net = build_model(config).to(device)
    model = net
    if ddp.active:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's initial weights and BatchNorm buffers.
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # One-cycle: warm up then anneal to ~0 over the planned epochs; if early stopping
    # cuts the run short, the best epoch is kept anyway.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    # bf16: tensor-core matmuls/convs without loss scaling.
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda")
    return _Run(config, net, model, optimiser, scheduler, autocast, generator)


def _train_epoch(run: _Run, pixels: torch.Tensor, labels: torch.Tensor, ddp: Dist) -> float:
    """One pass of optimisation steps over the shuffled training table; the mean loss."""
    config, preprocess = run.config, Preprocess()
    run.model.train()
    order = torch.randperm(len(labels), generator=run.generator).to(labels.device)
    loss_sum = 0.0
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        x = random_rotate(random_shift(pixels[idx], config.max_shift, run.generator), config.max_rotation, run.generator)
        x, y = rank_slice(x, ddp), rank_slice(labels[idx], ddp)
        with run.autocast:
            batch_sum = F.cross_entropy(run.model(preprocess(x)), y, reduction="sum")
        # DDP averages gradients over ranks, so sum * world_size / global batch makes
        # that average the gradient of the global batch's mean loss (one rank: the mean).
        loss = batch_sum * (ddp.world_size / len(idx))
        run.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        run.optimiser.step()
        run.scheduler.step()
        loss_sum += batch_sum.item()
    return sync_epoch(loss_sum, run.net, ddp, labels.device) / len(order)


def _record(run: _Run, epoch: int, train_loss: float, val_loss: float, val_acc: float) -> bool:
    """Append the epoch to the history, keep its weights if it is the best so far
    (lowest validation loss), decide early stopping; True when the epoch improved."""
    run.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
                        "lr": run.optimiser.param_groups[0]["lr"]})
    improved = val_loss < run.best_loss
    if improved:
        run.best_loss, run.best_acc, run.best_epoch = val_loss, val_acc, epoch
        run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in run.net.state_dict().items()}
    run.last_epoch = epoch
    run.stopped = epoch - run.best_epoch >= run.config.patience > 0
    return improved


def _checkpoint(run: _Run) -> dict[str, Any]:
    """The checkpoint dict (:mod:`kiln.checkpoint`): the best weights so far, plus under
    ``resume`` the last epoch's weights, optimiser, schedule, RNG and early-stopping
    state. Plain tensors, numbers and strings only: ``torch.load(weights_only=True)`` reads it."""
    history, best = list(run.history), dict(run.best_state)
    resume = {
        "epoch": run.last_epoch, "stopped": run.stopped,
        "model": {k: v.detach().to("cpu", copy=True) for k, v in run.net.state_dict().items()},
        "optimiser": run.optimiser.state_dict(), "scheduler": run.scheduler.state_dict(),
        "generator": run.generator.get_state(), "torch_rng": torch.get_rng_state(),
        "best_loss": run.best_loss, "best_acc": run.best_acc,
        "history": history, "best_state": best, "best_epoch": run.best_epoch,
    }
    return {"config": run.config.to_dict(), "state_dict": best, "history": history, "best_epoch": run.best_epoch,
            "kiln_version": kiln.__version__, "resume": resume}


def _restore(run: _Run, resume: Mapping[str, Any]) -> None:
    """Continue ``run`` from a checkpoint's ``resume`` state (every rank reads the same file)."""
    run.net.load_state_dict(resume["model"])
    run.optimiser.load_state_dict(resume["optimiser"])
    run.scheduler.load_state_dict(resume["scheduler"])
    run.generator.set_state(resume["generator"])
    torch.set_rng_state(resume["torch_rng"])
    run.history = list(resume["history"])
    run.best_loss, run.best_acc, run.best_epoch = resume["best_loss"], resume["best_acc"], resume["best_epoch"]
    run.best_state, run.last_epoch, run.stopped = resume["best_state"], resume["epoch"], resume["stopped"]
    run.resumed_from_epoch = resume["epoch"]


def _epochs(run: _Run, ddp: Dist) -> tqdm:
    """The epochs still to run, as a progress bar on rank 0 (none after an early stop)."""
    first, last = run.last_epoch + 1, run.config.epochs if not run.stopped else run.last_epoch
    return tqdm(range(first, last + 1), desc="epochs", unit="epoch", initial=first - 1, total=run.config.epochs,
                disable=None if ddp.rank == 0 else True, file=sys.stderr)


def _fit(config: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, checkpoint_path: Path,
         log: Callable[[str], None], resume_from: str | Path | None, ddp: Dist, device: torch.device) -> _Run:
    """The training loop proper (see :func:`train`)."""
    resume = read_resume_state(resume_from, config.to_dict()) if resume_from is not None else None
    train_x, train_y = _table_tensors(train_df, "train", device)
    val_x, val_y = _table_tensors(val_df, "val", device)
    log(f"train: {len(train_y)} training and {len(val_y)} validation images")
    run = _new_run(config, device, ddp, steps_per_epoch=math.ceil(len(train_y) / config.batch_size))
    if resume is not None:
        _restore(run, resume)
        log(f"train: resuming after epoch {run.last_epoch} (best epoch {run.best_epoch})")
    resumed_done = run.stopped or run.last_epoch >= config.epochs

    for epoch in (bar := _epochs(run, ddp)):
        started = time.perf_counter()
        train_loss = _train_epoch(run, train_x, train_y, ddp)
        run.loop_seconds += time.perf_counter() - started
        val_loss, val_acc = _evaluate(run.net, val_x, val_y, config.eval_batch_size)
        improved = _record(run, epoch, train_loss, val_loss, val_acc)
        if ddp.rank == 0 and run.best_state:  # the best so far + how to go on, should this run die
            save_atomically(_checkpoint(run), checkpoint_path)
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
        if ddp.rank == 0:  # the bar is off behind kfp.local's pipe: `kiln run` draws this one
            progress.emit("train", epoch, config.epochs, val_loss=round(val_loss, 4), val_acc=round(val_acc, 4))
        log(f"epoch {epoch}: train_loss={train_loss:.4f} val_loss={val_loss:.4f} "
            f"val_accuracy={val_acc:.4f}{' *' if improved else ''}")
        if run.stopped:
            log(f"train: early stop, no better val_loss for {config.patience} epochs")
            break
    bar.close()

    if not run.best_state:  # every val_loss was NaN: training diverged
        raise RuntimeError(f"training diverged: validation loss never finite ({run.history[-1]})")
    if ddp.rank == 0 and resumed_done:  # a finished run resumed: nothing trained, copy it over
        save_atomically(read_checkpoint(resume_from), checkpoint_path)
    return run


def train(
    config: TrainConfig,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    checkpoint_path: str | Path,
    log: Callable[[str], None] = print,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train ``config.model`` on the clean table ``train_df``, early-stopping on the
    validation loss over ``val_df``, and write the best epoch's weights to
    ``checkpoint_path`` (format in :mod:`kiln.checkpoint`).

    The checkpoint is rewritten (atomically) after every epoch, with the best weights
    so far and, under ``resume``, the state to continue from. ``resume_from`` names such
    a checkpoint (e.g. the one a preempted run left); the run continues after its last
    epoch, and on CPU ends exactly as an uninterrupted run would. Its config must equal
    ``config``, since the schedule and augmentation depend on every field.

    On CPU the run is deterministic: the same config, tables and thread count give the
    same history and weights. On CUDA it is seeded but not guaranteed bit-identical.
    The caller's global torch RNG state is left as it was.

    Distributed data parallel: run under ``torchrun --nproc-per-node N`` (or inside an
    initialised process group) and each of the N processes trains a DDP replica (on
    ``cuda:LOCAL_RANK`` when the device is CUDA, else CPU with gloo). Each rank trains on
    its slice of every global batch (:func:`kiln.distributed.rank_slice` says why), BatchNorm running
    statistics are averaged after each epoch, every rank validates on the whole
    validation table (so all stop together), and rank 0 alone logs and writes the checkpoint.
    """
    import torch.distributed as dist

    checkpoint_path, started = Path(checkpoint_path), time.perf_counter()
    ddp = setup_distributed(config.device)
    device = rank_device(config.device, ddp)
    if ddp.rank != 0:
        log = lambda _msg: None  # noqa: E731 (one voice per job)
    log(f"train: model={config.model} device={device} epochs<={config.epochs} seed={config.seed}"
        + (f" world_size={ddp.world_size}" if ddp.active else ""))
    try:
        with deterministic(device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            run = _fit(config, train_df, val_df, checkpoint_path, log, resume_from, ddp, device)
        if ddp.active:  # the others wait until rank 0's checkpoint is in place
            dist.barrier()
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()

    seconds = time.perf_counter() - started
    log(f"train: best epoch {run.best_epoch} val_loss={run.best_loss:.4f} val_accuracy={run.best_acc:.4f} in {seconds:.1f}s")
    return TrainResult(
        best_val_loss=run.best_loss, best_val_accuracy=run.best_acc, best_epoch=run.best_epoch,
        epochs_run=len(run.history), history=run.history, seconds=seconds, device=str(device),
        checkpoint_path=checkpoint_path, world_size=ddp.world_size, weights_sha256=weights_sha256(run.best_state),
        loop_seconds=run.loop_seconds, resumed_from_epoch=run.resumed_from_epoch,
    )


__all__ = ["DEVICES", "MODELS", "TrainConfig", "TrainResult", "curves_png", "main", "run_train", "train",
           "write_curves"]


def curves_png(history: list[Mapping[str, float]], best_epoch: int | None = None) -> bytes:
    """PNG bytes of the training curves: train/val loss (left) and val accuracy (right)
    per epoch, the best epoch marked. Rendered with matplotlib's Agg backend (no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("no epochs to plot")
    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg, whatever the global backend is
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], "o-", label="val loss")
    acc_ax.plot(epochs, [r["val_accuracy"] for r in history], "o-", color="tab:green", label="val accuracy")
    for ax, title in ((loss_ax, "cross-entropy"), (acc_ax, "validation accuracy")):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_curves(history: list[Mapping[str, float]], path: str | Path, best_epoch: int | None = None) -> Path:
    """Write the curves to ``path``: a PNG file if it ends in ``.png``, otherwise a
    self-contained HTML page with the PNG inline (base64) and the numbers in a table."""
    path = Path(path)
    png = curves_png(history, best_epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        path.write_bytes(png)
        return path
    rows = "".join(
        f"<tr><td>{int(r['epoch'])}</td><td>{r['train_loss']:.4f}</td><td>{r['val_loss']:.4f}</td>"
        f"<td>{r['val_accuracy']:.4f}</td><td>{r['lr']:.2e}</td></tr>"
        for r in history
    )
    path.write_text(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>kiln training curves</title>'
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 8px}"
        "table{border-collapse:collapse}</style></head><body><h1>Training curves</h1>"
        f'<img alt="training curves" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        "<table><tr><th>epoch</th><th>train loss</th><th>val loss</th><th>val accuracy</th><th>lr</th></tr>"
        f"{rows}</table></body></html>\n",
        encoding="utf-8",
    )
    return path



def _run_torchrun(
    train_path: str | Path, val_path: str | Path, checkpoint_path: str | Path, config: TrainConfig, nproc: int
) -> TrainResult:
    """:func:`main` in ``nproc`` processes (:func:`kiln.distributed.launch`); rank 0's TrainResult."""
    with tempfile.TemporaryDirectory(prefix="kiln-ddp-") as tmp:
        result_path = Path(tmp) / "result.json"
        launch(["kiln.train", "--train", str(train_path), "--val", str(val_path), "--checkpoint", str(checkpoint_path),
                "--config", json.dumps(config.to_dict()), "--result", str(result_path)], nproc)
        if not result_path.is_file():
            raise RuntimeError(f"distributed training wrote no result to {result_path}")
        data = json.loads(result_path.read_text())
    data.pop("rank", None)
    data["checkpoint_path"] = Path(data["checkpoint_path"])
    return TrainResult(**data)


def run_train(
    train_path: str | Path,
    val_path: str | Path,
    checkpoint_path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    curves_path: str | Path | None = None,
    nproc: int = 1,
) -> TrainResult:
    """File-level entry point of the train step: clean tables in, checkpoint out.

    ``overrides`` replace fields of the default TrainConfig (unknown keys are refused);
    ``log_metric`` receives the per-epoch curves and the best epoch's figures (e.g. a
    KFP ``Output[Metrics].log_metric``); given ``curves_path``, the curves are plotted
    there (see :func:`write_curves`: ``.png`` or inline-PNG HTML). ``nproc`` > 1 trains
    with DDP in that many processes started by ``torchrun`` (one per GPU on CUDA; gloo
    on CPU), see :func:`train`.
    """
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **(overrides or {})})
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if nproc == 1:
        result = train(config, read_table(train_path, CLEAN_COLUMNS), read_table(val_path, CLEAN_COLUMNS), checkpoint_path)
    else:
        result = _run_torchrun(train_path, val_path, checkpoint_path, config, nproc)
    if curves_path is not None:
        write_curves(result.history, curves_path, result.best_epoch)
    if log_metric is not None:
        for row in result.history:
            for key in ("train_loss", "val_loss", "val_accuracy"):
                log_metric(f"epoch{int(row['epoch']):02d}_{key}", float(row[key]))
        log_metric("best_epoch", result.best_epoch)
        log_metric("best_val_loss", result.best_val_loss)
        log_metric("best_val_accuracy", result.best_val_accuracy)
        log_metric("train_seconds", result.seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.train``: one training process, for launchers such as
    ``torchrun --nproc-per-node N -m kiln.train --train T --val V --checkpoint C``.

    ``--config`` is a JSON object of TrainConfig overrides; ``--result`` a path for the
    TrainResult JSON, where ``{rank}`` is replaced by the process's rank (default: only
    rank 0 writes it).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kiln.train", description=main.__doc__)
    parser.add_argument("--train", required=True, help="clean training table (Parquet)")
    parser.add_argument("--val", required=True, help="clean validation table (Parquet)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to write (rank 0)")
    parser.add_argument("--config", default="{}", help="JSON object of TrainConfig overrides")
    parser.add_argument("--result", default=None, help="TrainResult JSON path; '{rank}' is replaced by the rank")
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **json.loads(args.config)})
    result = train(config, read_table(args.train, CLEAN_COLUMNS), read_table(args.val, CLEAN_COLUMNS), args.checkpoint)
    rank = int(os.environ.get("RANK", "0"))
    if args.result and ("{rank}" in args.result or rank == 0):
        out = Path(args.result.replace("{rank}", str(rank)))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result.to_dict(), "rank": rank}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
