"""`kiln models list|promote|rollback` on a real model store: the table, the atomic and
audited alias moves, the Triton version policy, and a running `kiln serve` following them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import REPO_ROOT, tiny_onnx
from kiln.cli import main
from kiln.store import META_FILE, TRITON_CONFIG, ModelStore

MODEL = "mnist"
POLL_INTERVAL_S = 0.2


def servable_onnx(path: Path, note: str) -> Path:
    """A tiny ONNX model ONNX Runtime loads; ``note`` makes each one's bytes differ."""
    import onnx

    model = onnx.load(str(tiny_onnx(path)))
    model.ir_version = 9
    model.doc_string = note
    onnx.save(model, str(path))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store with versions 1..3 (accuracy .91/.92/.93, data versions a*/b*/c*); production 3."""
    root = tmp_path / "models"
    store = ModelStore(root)
    for i, data in enumerate("abc", start=1):
        meta = {"metrics": {"accuracy": 0.9 + i / 100, "f1_macro": 0.8 + i / 100}, "data_version": data * 32}
        version = store.add_version(MODEL, servable_onnx(tmp_path / f"v{i}.onnx", f"v{i}"), meta)
        store.set_alias(MODEL, version.version, reason=f"deploy {i}", action="deploy")
    return root


def models(store: Path, *args: str) -> int:
    return main(["models", *args, "--store", str(store)])


def test_list_shows_versions_alias_metrics_data_version_and_creation(store: Path, capsys) -> None:
    assert models(store, "list") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["VERSION", "ALIAS", "ACCURACY", "MACRO", "F1", "DATA", "VERSION", "CREATED", "(UTC)"]
    assert [row.split()[:5] for row in rows] == [
        ["3", "production", "0.9300", "0.8300", "c" * 12],
        ["2", "-", "0.9200", "0.8200", "b" * 12],
        ["1", "-", "0.9100", "0.8100", "a" * 12],
    ]
    created = ModelStore(store).get(MODEL, "1").meta["created"]
    assert rows[-1].split()[5:] == created[:19].split("T")


def test_promote_and_rollback_move_the_alias_with_an_audit_line(store: Path, capsys,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_ACTOR", "alice@ci")
    s = ModelStore(store)
    assert models(store, "rollback", "--reason", "v3 misreads 7s") == 0
    assert s.alias(MODEL) == "2"
    assert "production 3 -> 2" in capsys.readouterr().out
    audit = json.loads((store / MODEL / "2" / META_FILE).read_text())["audit"][-1]
    assert {k: audit[k] for k in ("action", "from", "to", "who", "why")} == {
        "action": "rollback", "from": "3", "to": "2", "who": "alice@ci", "why": "v3 misreads 7s"}
    assert audit["when"].endswith("+00:00")
    assert "versions: [ 2 ]" in (store / MODEL / TRITON_CONFIG).read_text()

    # a second rollback walks further back through the deploys, not back to 3
    assert models(store, "rollback") == 0 and s.alias(MODEL) == "1"
    assert models(store, "promote", "3", "--reason", "fixed upstream") == 0 and s.alias(MODEL) == "3"
    assert "versions: [ 3 ]" in (store / MODEL / TRITON_CONFIG).read_text()
    moves = [(e["action"], e["from"], e["to"]) for e in s.history(MODEL)]
    assert moves == [("deploy", None, "1"), ("deploy", "1", "2"), ("deploy", "2", "3"), ("rollback", "3", "2"),
                     ("rollback", "2", "1"), ("promote", "1", "3")]
    assert models(store, "promote", "3") == 0
    assert "already is production" in capsys.readouterr().out
    assert len(s.history(MODEL)) == 6  # nothing moved, nothing audited


def test_promoting_a_missing_version_changes_nothing(store: Path, capsys) -> None:
    assert models(store, "promote", "9") != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no version '9'" in err
    assert ModelStore(store).alias(MODEL) == "3"


@pytest.fixture
def server(store: Path, tmp_path: Path) -> Iterator[str]:
    """A real `kiln serve` on a loopback port over ``store``, polling every 0.2 s."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "serve", "--store", str(store), "--model", MODEL, "--port", str(port),
         "--poll-interval-s", str(POLL_INTERVAL_S), "--no-batching", "--drain-delay-s", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        assert serving(url, "3", limit_s=60), f"server not ready: {(tmp_path / 'server.log').read_text()[-2000:]}"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serving(url: str, version: str, limit_s: float) -> bool:
    """Whether the server reports ``version`` as the model's production within ``limit_s``."""
    deadline = time.monotonic() + limit_s
    with httpx.Client(timeout=5) as http:
        while time.monotonic() < deadline:
            try:
                response = http.get(f"{url}/v2/models/{MODEL}/ready")
                if response.status_code == 200 and response.json()["version"] == version:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    return False


def test_a_running_server_follows_promote_and_rollback(store: Path, server: str) -> None:
    assert models(store, "rollback") == 0
    assert serving(server, "2", limit_s=POLL_INTERVAL_S + 5)
    assert models(store, "promote", "3") == 0
    assert serving(server, "3", limit_s=POLL_INTERVAL_S + 5)
    page = httpx.get(server + "/", timeout=5)  # the demo page, served by the same server
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'const MODEL = "{MODEL}";' in page.text and "<canvas" in page.text
