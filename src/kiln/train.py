"""Train a digit classifier on clean tables and keep the best checkpoint.

The networks here take float images that are already normalised, shaped
[N, 1, 28, 28]. Normalisation is the job of :class:`Preprocess`, which training and
:class:`ServingModel` share, so the exported ONNX graph (uint8 in, see
:mod:`kiln.contract`) computes exactly what training saw.

A checkpoint is a ``torch.save`` of plain data (loadable with ``weights_only=True``)::

    {"config": TrainConfig.to_dict(), "state_dict": ..., "history": [...],
     "best_epoch": int, "kiln_version": str, "resume": {...}}

``state_dict`` holds the best epoch's weights; ``resume`` what :func:`train` needs to
continue the run (last weights, optimiser, schedule, RNG states). :func:`load_checkpoint`
rebuilds the network from the saved config alone.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import kiln
from kiln.contract import IMAGE_SIZE, NUM_CLASSES
from kiln.dataset import CLEAN_COLUMNS, read_table, to_arrays

MNIST_MEAN = 0.1307
"""Mean of MNIST training pixels scaled to [0, 1]; the usual published constant."""

MNIST_STD = 0.3081
"""Standard deviation of MNIST training pixels scaled to [0, 1]."""

MODELS = ("cnn", "mlp")
DEVICES = ("auto", "cpu", "cuda")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not one this module wrote."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Saved verbatim in the checkpoint."""

    model: str = "cnn"
    """Architecture: ``"cnn"`` (two conv blocks + MLP head) or ``"mlp"`` (784-512-10)."""

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
    """Batch size for validation passes; only affects speed and memory (on CPU, 256
    runs about twice as fast as 1024: the activations stay in cache)."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"TrainConfig.model must be one of {MODELS}, got {self.model!r}")
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig.device must be one of {DEVICES}, got {self.device!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("patience", "max_shift", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative int, got {value!r}")
        if self.max_shift >= IMAGE_SIZE:
            raise ValueError(f"TrainConfig.max_shift must be < {IMAGE_SIZE}, got {self.max_shift}")
        for name in ("lr", "weight_decay", "dropout", "max_rotation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.max_rotation <= 45:
            raise ValueError(f"TrainConfig.max_rotation must be in [0, 45] degrees, got {self.max_rotation}")
        if not isinstance(self.amp, bool):
            raise ValueError(f"TrainConfig.amp must be a bool, got {self.amp!r}")

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


# --------------------------------------------------------------------------- models


class Preprocess(nn.Module):
    """uint8 [N, 28, 28] pixels -> float32 [N, 1, 28, 28], scaled to [0, 1] and
    standardised with the MNIST constants. Shared by training and serving."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32) * (1.0 / 255.0)
        return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


class ConvNet(nn.Module):
    """conv(32) -> pool -> conv(64) -> pool -> 128 -> 10. About 420k parameters; a few
    seconds per epoch on 4,000 digits on two CPU cores."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """784 -> 512 -> 10 with ReLU; the simple baseline."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(config: TrainConfig) -> nn.Module:
    """A freshly initialised network for ``config.model``: normalised float
    [N, 1, 28, 28] in, logits float [N, 10] out. Initialisation draws from torch's
    global RNG, so seed it first for a reproducible start."""
    if config.model == "cnn":
        return ConvNet(config.dropout)
    if config.model == "mlp":
        return MLP(config.dropout)
    raise ValueError(f"unknown model {config.model!r}")  # unreachable: config validates


class ServingModel(nn.Module):
    """The exported model: uint8 pixels [N, 28, 28] -> (probabilities float32 [N, 10],
    label int64 [N]), per :mod:`kiln.contract`. Always used in eval mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.preprocess = Preprocess()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.net(self.preprocess(pixels)), dim=1)
        label = torch.argmax(probabilities, dim=1)  # int64, as the contract requires
        return probabilities, label


# --------------------------------------------------------------------------- training


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without a GPU raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device is 'cuda' but torch.cuda.is_available() is False")
    return torch.device(device)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each uint8 image [N, 28, 28] by its own random (dy, dx) in
    [-max_shift, max_shift], filling with zeros. Randomness comes only from
    ``generator`` (a CPU generator), so it is reproducible on any device."""
    if max_shift == 0:
        return images
    n, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s))
    offsets = torch.randint(0, 2 * s + 1, (2, n), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device)[None, :] + offsets[0][:, None]  # [N, H]
    cols = torch.arange(w, device=images.device)[None, :] + offsets[1][:, None]  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each uint8 image [N, 28, 28] about its centre by its own random angle in
    [-max_degrees, max_degrees] (bilinear, zeros outside), returning uint8. Angles come
    only from ``generator`` (CPU), the resampling runs on the images' device."""
    if max_degrees == 0:
        return images
    n = images.shape[0]
    angles = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    x = images.to(torch.float32).unsqueeze(1)
    grid = F.affine_grid(theta.to(device=images.device, dtype=torch.float32), list(x.shape), align_corners=False)
    with torch.no_grad():
        rotated = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.squeeze(1).round_().clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def _evaluate(
    model: nn.Module, preprocess: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on a whole table, in eval mode."""
    model.eval()
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


def _save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename it into place, so a
    crash never leaves a truncated checkpoint under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and raw bytes, in key order."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class _Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when :func:`train` initialised the process group and must destroy it."""

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _setup_distributed(device: str) -> _Dist:
    """Join the torch.distributed job this process belongs to, if any.

    An already initialised default process group is used as is. Otherwise, when the
    launcher (``torchrun``) set ``WORLD_SIZE`` > 1, the group is initialised from the
    environment: NCCL when training on CUDA, gloo on CPU.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)


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
    ``checkpoint_path`` (format in the module docstring).

    The checkpoint is rewritten (atomically) after every epoch, with the best weights
    so far and, under ``resume``, the state to continue from: the last epoch's weights,
    optimiser, schedule, RNG states and early-stopping state. ``resume_from`` names such
    a checkpoint (e.g. the one a preempted run left); the run continues after its last
    epoch, and on CPU ends exactly as an uninterrupted run would. Its config must equal
    ``config``, since the schedule and augmentation depend on every field.

    On CPU the run is deterministic: the same config, tables and thread count give the
    same history and weights. On CUDA it is seeded but not guaranteed bit-identical.
    The caller's global torch RNG state is left as it was.

    Distributed data parallel: run under ``torchrun --nproc-per-node N`` (or inside an
    initialised process group) and each of the N processes trains a DDP replica (on
    ``cuda:LOCAL_RANK`` when the device is CUDA, else CPU with gloo). Every rank draws
    the same shuffling and augmentation, takes its contiguous slice of each global batch
    of ``batch_size`` images and scales its loss so the averaged gradient is the
    gradient of the whole batch: the run follows the single-process one up to
    floating-point reduction order, dropout masks and per-slice BatchNorm statistics.
    BatchNorm running statistics are averaged over the ranks after each epoch, then
    every rank validates on the whole validation table (so all stop together); rank 0
    alone logs and writes the checkpoint.
    """
    import torch.distributed as dist

    # --- setup ---
    checkpoint_path = Path(checkpoint_path)
    ddp = _setup_distributed(config.device)
    device = resolve_device(config.device)
    if ddp.active and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    if ddp.rank != 0:
        log = lambda _msg: None  # noqa: E731 (one voice per job)
    started = time.perf_counter()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    # Some CUDA kernels have no deterministic version; warn there instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    # Deterministic mode also fills every new tensor with NaN (to expose reads of
    # uninitialised memory): 13-26% of a plain CPU loop's time here, and no op we run
    # reads unwritten memory.
    torch.utils.deterministic.fill_uninitialized_memory = False
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):  # don't disturb the caller's RNG
            torch.manual_seed(config.seed)
            generator = torch.Generator().manual_seed(config.seed)  # shuffling + augmentation
            log(
                f"train: model={config.model} device={device} epochs<={config.epochs} seed={config.seed}"
                + (f" world_size={ddp.world_size}" if ddp.active else "")
            )

            # --- resume state (a checkpoint this config wrote) ---
            resume = _read_resume_state(resume_from, config) if resume_from is not None else None

            # --- data ---
            train_x, train_y = _table_tensors(train_df, "train", device)
            val_x, val_y = _table_tensors(val_df, "val", device)
            steps_per_epoch = math.ceil(len(train_y) / config.batch_size)
            log(f"train: {len(train_y)} training and {len(val_y)} validation images")

            # --- model & optimiser ---
            preprocess = Preprocess()
            net = build_model(config).to(device)
            model: nn.Module = net
            if ddp.active:
                from torch.nn.parallel import DistributedDataParallel

                # DDP broadcasts rank 0's initial weights and BatchNorm buffers.
                model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
            optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            # One-cycle: warm up then anneal to ~0 over the planned epochs. If early
            # stopping cuts the run short we keep the best epoch anyway.
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
            )
            # bf16 autocast on CUDA: tensor-core matmuls/convs without loss scaling.
            autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                      enabled=config.amp and device.type == "cuda")

            # --- epochs ---
            history: list[dict[str, float]] = []
            best_loss, best_acc, best_epoch = math.inf, 0.0, 0
            best_state: dict[str, torch.Tensor] = {}
            loop_seconds = 0.0
            first_epoch, stopped, saved = 1, False, False
            if resume is not None:
                net.load_state_dict(resume["model"])  # every rank reads the same file
                optimiser.load_state_dict(resume["optimiser"])
                scheduler.load_state_dict(resume["scheduler"])
                generator.set_state(resume["generator"])
                torch.set_rng_state(resume["torch_rng"])
                history = list(resume["history"])
                best_loss, best_acc, best_epoch = resume["best_loss"], resume["best_acc"], resume["best_epoch"]
                best_state = resume["best_state"]
                first_epoch, stopped = resume["epoch"] + 1, resume["stopped"]
                log(f"train: resuming after epoch {resume['epoch']} (best epoch {best_epoch})")
            bar = tqdm(range(first_epoch, config.epochs + 1 if not stopped else first_epoch), desc="epochs",
                       unit="epoch", initial=first_epoch - 1, total=config.epochs,
                       disable=None if ddp.rank == 0 else True, file=sys.stderr)
            for epoch in bar:
                model.train()
                order = torch.randperm(len(train_y), generator=generator).to(device)
                running = 0.0
                loop_started = time.perf_counter()
                for start in range(0, len(order), config.batch_size):
                    idx = order[start : start + config.batch_size]
                    # Augment the whole global batch (same draws on every rank), then slice.
                    pixels = random_rotate(random_shift(train_x[idx], config.max_shift, generator),
                                           config.max_rotation, generator)
                    x = preprocess(pixels)
                    y = train_y[idx]
                    if ddp.active:
                        part = torch.tensor_split(torch.arange(len(idx), device=device), ddp.world_size)[ddp.rank]
                        x, y = x[part], y[part]
                        # DDP averages gradients over ranks: sum / global batch * world_size
                        # makes that average the gradient of the global batch's mean loss.
                        with autocast:
                            loss_sum = F.cross_entropy(model(x), y, reduction="sum")
                        loss = loss_sum * (ddp.world_size / len(idx))
                    else:
                        with autocast:
                            loss = F.cross_entropy(model(x), y)
                        loss_sum = loss.detach() * len(idx)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    scheduler.step()
                    running += loss_sum.item()
                if ddp.active:
                    total = torch.tensor([running], dtype=torch.float64, device=device)
                    dist.all_reduce(total)
                    running = float(total.item())
                    # Each rank's BatchNorm running statistics saw only its slices: average
                    # them so every rank validates (and saves) the same network.
                    with torch.no_grad():
                        for buffer in net.buffers():
                            if buffer.is_floating_point():
                                dist.all_reduce(buffer)
                                buffer.div_(ddp.world_size)
                loop_seconds += time.perf_counter() - loop_started
                train_loss = running / len(order)
                val_loss, val_acc = _evaluate(net, preprocess, val_x, val_y, config.eval_batch_size)
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "lr": optimiser.param_groups[0]["lr"],
                }
                history.append(row)
                improved = val_loss < best_loss
                if improved:
                    best_loss, best_acc, best_epoch = val_loss, val_acc, epoch
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                stopped = epoch - best_epoch >= config.patience > 0
                if ddp.rank == 0 and best_state:  # the best so far + how to go on, should this run die
                    _save_atomically(
                        _checkpoint(config, best_state, history, best_epoch, resume={
                            "epoch": epoch, "stopped": stopped, "model": net.state_dict(),
                            "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                            "best_loss": best_loss, "best_acc": best_acc,
                        }),
                        checkpoint_path,
                    )
                    saved = True
                bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
                log(
                    f"epoch {epoch}: train_loss={train_loss:.4f} val_loss={val_loss:.4f} "
                    f"val_accuracy={val_acc:.4f}{' *' if improved else ''}"
                )
                if stopped:
                    log(f"train: early stop, no better val_loss for {config.patience} epochs")
                    break
            bar.close()
            if not best_state:  # every val_loss was NaN: training diverged
                raise RuntimeError(f"training diverged: validation loss never finite ({history[-1]})")

            # --- checkpoint (rank 0 wrote it after each epoch; the others wait until it is in place) ---
            if ddp.rank == 0 and not saved and resume is not None:  # resumed a finished run: nothing to train
                _save_atomically(read_checkpoint(resume_from), checkpoint_path)
            if ddp.active:
                dist.barrier()
    finally:
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
        if ddp.owns_group:
            dist.destroy_process_group()

    seconds = time.perf_counter() - started
    log(f"train: best epoch {best_epoch} val_loss={best_loss:.4f} val_accuracy={best_acc:.4f} in {seconds:.1f}s")
    return TrainResult(
        best_val_loss=best_loss,
        best_val_accuracy=best_acc,
        best_epoch=best_epoch,
        epochs_run=len(history),
        history=history,
        seconds=seconds,
        device=str(device),
        checkpoint_path=checkpoint_path,
        world_size=ddp.world_size,
        weights_sha256=weights_sha256(best_state),
        loop_seconds=loop_seconds,
        resumed_from_epoch=0 if resume is None else resume["epoch"],
    )


def _checkpoint(config: TrainConfig, best_state: Mapping[str, torch.Tensor], history: list[dict[str, float]],
                best_epoch: int, resume: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict (module docstring): plain tensors, numbers and strings only,
    so ``torch.load(weights_only=True)`` reads it back."""
    resume = {**resume, "model": {k: v.detach().to("cpu", copy=True) for k, v in resume["model"].items()},
              "history": list(history), "best_state": dict(best_state), "best_epoch": best_epoch}
    return {"config": config.to_dict(), "state_dict": dict(best_state), "history": list(history),
            "best_epoch": best_epoch, "kiln_version": kiln.__version__, "resume": resume}


def _read_resume_state(path: str | Path, config: TrainConfig) -> dict[str, Any]:
    """The ``resume`` part of a checkpoint written with ``config``; :class:`CheckpointError` otherwise."""
    ckpt = read_checkpoint(path)
    if "resume" not in ckpt:
        raise CheckpointError(f"{path} holds no resume state (written by an older kiln?)")
    if ckpt["config"] != config.to_dict():
        diff = sorted(k for k in config.to_dict() if ckpt["config"].get(k) != getattr(config, k))
        raise CheckpointError(f"cannot resume {path}: it was trained with a different config (fields {diff})")
    return ckpt["resume"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, loaded on CPU with ``weights_only=True`` (no pickled
    code runs). Raises :class:`CheckpointError` if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    missing = [k for k in ("config", "state_dict") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a kiln checkpoint: missing {missing}")
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[TrainConfig, nn.Module]:
    """Rebuild ``(config, network)`` from a checkpoint written by :func:`train`.

    The architecture comes from the saved config, and the weights must match it
    exactly (strict load). The network is on CPU, in eval mode, and takes normalised
    float input; wrap it in :class:`ServingModel` for uint8 pixels.
    """
    ckpt = read_checkpoint(path)
    try:
        config = TrainConfig.from_dict(ckpt["config"])
        model = build_model(config)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not match its config: {e}") from e
    return config, model.eval()


def predict_proba(model: nn.Module, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Probabilities float32 [N, 10] from a network returned by :func:`load_checkpoint`
    for uint8 pixels [N, 28, 28], on CPU, through the same path as serving."""
    serving = ServingModel(model).eval()
    out = [np.zeros((0, NUM_CLASSES), np.float32)]
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            batch = torch.tensor(pixels[start : start + batch_size])  # copies: input may be read-only
            out.append(serving(batch)[0].numpy())
    return np.concatenate(out)


__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "CheckpointError",
    "MLP",
    "ConvNet",
    "Preprocess",
    "ServingModel",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "curves_png",
    "load_checkpoint",
    "predict_proba",
    "random_shift",
    "read_checkpoint",
    "resolve_device",
    "train",
    "weights_sha256",
    "write_curves",
]


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
    """Run ``python -m kiln.train`` under ``torchrun --standalone --nproc-per-node nproc``
    and return rank 0's TrainResult. Raises RuntimeError if the job fails."""
    import json
    import subprocess

    with tempfile.TemporaryDirectory(prefix="kiln-ddp-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "kiln.train", "--train", str(train_path), "--val", str(val_path),
            "--checkpoint", str(checkpoint_path), "--config", json.dumps(config.to_dict()), "--result", str(result_path),
        ]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"distributed training failed (exit {proc.returncode}): {' '.join(cmd)}")
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
    import json

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
