"""Where a training process runs: its device, its determinism switches, and its place
in a torch.distributed job.

:func:`kiln.train.train` calls these around its loop; a plain run is rank 0 of 1, for
which the DDP helpers change nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without a GPU raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device is 'cuda' but torch.cuda.is_available() is False")
    return torch.device(device)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when :func:`setup_distributed` initialised the process group and must destroy it."""

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Dist:
    """Join the torch.distributed job this process belongs to, if any.

    An already initialised default process group is used as is. Otherwise, when the
    launcher (``torchrun``) set ``WORLD_SIZE`` > 1, the group is initialised from the
    environment: NCCL when training on CUDA, gloo on CPU.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)


def rank_device(device: str, ddp: Dist) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for a CUDA DDP rank."""
    resolved = resolve_device(device)
    if ddp.active and resolved.type == "cuda":
        resolved = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(resolved)
    return resolved


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of a run, the caller's settings restored
    after. Some CUDA kernels have no deterministic version: warn there instead of failing.
    Deterministic mode would also fill every new tensor with NaN (to expose reads of
    uninitialised memory); no op here reads unwritten memory and the fill is a sizeable
    share of a CPU step (README, Benchmarks), so it stays off."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def rank_slice(batch: torch.Tensor, ddp: Dist) -> torch.Tensor:
    """This rank's contiguous share of a global batch.

    Every rank draws the same shuffle and augmentation for the whole global batch (one
    shared generator) and keeps only its slice, instead of a DistributedSampler with
    per-rank augmentation. Why: with the loss scaled by world_size / global batch (see
    :func:`kiln.train._train_epoch`), DDP's gradient average is exactly the gradient of the whole
    batch, so an N-rank run follows the one-process run up to float reduction order,
    dropout masks and per-slice BatchNorm statistics: a run reproduces whatever the
    world size. The price, augmenting the whole batch on every rank, is small for
    uint8 shifts and one grid_sample.
    """
    return torch.tensor_split(batch, ddp.world_size)[ddp.rank] if ddp.active else batch


def sync_epoch(loss_sum: float, net: nn.Module, ddp: Dist, device: torch.device) -> float:
    """The loss summed over every rank; each rank's BatchNorm running statistics saw only
    its slices, so they are averaged to make every rank validate (and save) one network."""
    if not ddp.active:
        return loss_sum
    import torch.distributed as dist

    total = torch.tensor([loss_sum], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    with torch.no_grad():
        for buffer in net.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(ddp.world_size)
    return float(total.item())


def launch(module_args: list[str], nproc: int) -> None:
    """Run ``python -m <module_args>`` under ``torchrun --standalone --nproc-per-node
    nproc`` (one process per GPU on CUDA, gloo ranks on CPU); RuntimeError if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", *module_args]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}): {' '.join(cmd)}")


__all__ = ["Dist", "deterministic", "launch", "rank_device", "rank_slice", "resolve_device", "setup_distributed", "sync_epoch"]
