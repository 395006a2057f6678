"""Serving scale-out: N replicas reading one model store (the ReadWriteMany PVC behind
the HPA's pods) converge on the same production version within ``poll_interval_s``
when the alias moves. Three real ``kiln serve`` processes on loopback, one store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import REPO_ROOT, tiny_onnx
from kiln.deploy import deploy
from kiln.store import ModelStore

pytestmark = pytest.mark.slow  # three kiln serve processes

MODEL = "mnist"
REPLICAS = 3
POLL_INTERVAL_S = 0.5
SLACK_S = 1.5
"""Loading the new version (checksum, ONNX Runtime session, warm-up) after the poll sees
it, on a 2-core machine shared with other tests."""


def servable_onnx(path: Path) -> Path:
    """A tiny ONNX model that ONNX Runtime loads, tagged with its file name (one sha256 per file)."""
    return tiny_onnx(path, tag=path.name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def production_version(http: httpx.Client, url: str) -> str | None:
    try:
        response = http.get(f"{url}/v2/models/{MODEL}/ready")
    except httpx.TransportError:
        return None
    return response.json()["version"] if response.status_code == 200 else None


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """(store root, base URLs) of REPLICAS servers on one store whose production is version 1."""
    store = tmp_path / "models"
    assert deploy(servable_onnx(tmp_path / "v1.onnx"), store, MODEL, {"note": "v1"}).version == "1"
    kiln = Path(sys.executable).with_name("kiln")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    ports = [_free_port() for _ in range(REPLICAS)]
    procs = [subprocess.Popen(
        [str(kiln), "serve", "--store", str(store), "--model", MODEL, "--port", str(port),
         "--poll-interval-s", str(POLL_INTERVAL_S), "--no-batching", "--drain-delay-s", "0", "--grpc-port", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / f"server{port}.log").open("wb"),
    ) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(timeout=5) as http:
            while [production_version(http, url) for url in urls] != ["1"] * REPLICAS:
                dead = [p.args for p in procs if p.poll() is not None]
                assert not dead, f"a server exited: {dead}"
                assert time.monotonic() < deadline, "servers did not become ready"
                time.sleep(0.2)
        yield store, urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def converge(urls: list[str], version: str, started: float, limit_s: float) -> list[float]:
    """Seconds after ``started`` at which each replica first reported ``version``."""
    seen: dict[str, float] = {}
    with httpx.Client(timeout=5) as http:
        while len(seen) < len(urls) and time.monotonic() - started < limit_s + 5:
            for url in urls:
                if url not in seen and production_version(http, url) == version:
                    seen[url] = time.monotonic() - started
            time.sleep(0.02)
    assert len(seen) == len(urls), f"only {sorted(seen)} switched to version {version}"
    return [seen[url] for url in urls]


def test_replicas_on_one_store_converge_when_the_alias_moves(replicas, tmp_path: Path) -> None:
    store, urls = replicas
    limit = POLL_INTERVAL_S + SLACK_S
    # a new version deployed: stored whole, then the alias moves atomically
    started = time.monotonic()
    assert deploy(servable_onnx(tmp_path / "v2.onnx"), store, MODEL, {"note": "v2"}).version == "2"
    times = converge(urls, "2", started, limit)
    assert max(times) <= limit, f"replicas switched after {times} s; limit {limit} s"
    # a rollback is an alias move too
    started = time.monotonic()
    ModelStore(store).set_alias(MODEL, "1")
    times = converge(urls, "1", started, limit)
    assert max(times) <= limit, f"replicas rolled back after {times} s; limit {limit} s"
    with httpx.Client(timeout=5) as http:
        assert {production_version(http, url) for url in urls} == {"1"}
