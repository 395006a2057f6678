"""Checkpoint files: atomic writes, safe reads, and rebuilding the network they hold.

A checkpoint is a ``torch.save`` of plain data (loadable with ``weights_only=True``)::

    {"config": TrainConfig.to_dict(), "state_dict": ..., "history": [...],
     "best_epoch": int, "kiln_version": str, "resume": {...}}

``state_dict`` holds the best epoch's weights; ``resume`` what :func:`kiln.train.train`
needs to continue the run. :func:`load_checkpoint` rebuilds the network from the saved
config alone, through the family registry of :mod:`kiln.models`, so export and
evaluation never import the training module.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.models import build_model


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not one kiln wrote."""


def save_atomically(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename it into place, so a
    crash never leaves a truncated checkpoint under the final name."""
    path = Path(path)
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
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


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


def read_resume_state(path: str | Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``resume`` part of a checkpoint written with training config ``config`` (a
    dict); :class:`CheckpointError` if it has none or was trained with another config,
    since the schedule and augmentation depend on every field."""
    ckpt = read_checkpoint(path)
    if "resume" not in ckpt:
        raise CheckpointError(f"{path} holds no resume state (written by an older kiln?)")
    if ckpt["config"] != dict(config):
        diff = sorted(k for k in config if ckpt["config"].get(k) != config[k])
        raise CheckpointError(f"cannot resume {path}: it was trained with a different config (fields {diff})")
    return ckpt["resume"]


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], nn.Module]:
    """``(config dict, network)`` from a checkpoint written by :func:`kiln.train.train`.

    The family and its sizes come from the saved config, and the weights must match
    them exactly (strict load). The network is on CPU, in eval mode, and takes
    normalised float input; wrap it in :class:`kiln.models.ServingModel` for uint8 pixels.
    """
    ckpt = read_checkpoint(path)
    config = ckpt["config"]
    try:
        if not isinstance(config, dict):
            raise TypeError(f"config is a {type(config).__name__}, not a dict")
        model = build_model(config)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not match its config: {e}") from e
    return dict(config), model.eval()


__all__ = ["CheckpointError", "load_checkpoint", "read_checkpoint", "read_resume_state", "save_atomically", "weights_sha256"]
