"""Configuration (KILN_* variables and flags) and graceful shutdown of the real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kiln.serving.config import ServerSettings
from kiln.serving.server import load_settings, parse_args

MODEL = "mnist"


def test_settings_come_from_kiln_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "KILN_MODEL_STORE": "/mnt/models",
        "KILN_MODEL_NAME": "fashion",
        "KILN_MAX_BATCH_SIZE": "8",
        "KILN_MAX_QUEUE_DELAY_US": "250",
        "KILN_BATCHING": "false",
        "KILN_POLL_INTERVAL_S": "0.5",
        "KILN_MAX_BODY_BYTES": "1024",
        "KILN_KEEP_VERSIONS": "5",
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings([])
    assert s.model_store == Path("/mnt/models") and s.model_name == "fashion"
    assert (s.max_batch_size, s.max_queue_delay_us, s.batching) == (8, 250, False)
    assert (s.poll_interval_s, s.max_body_bytes, s.keep_versions) == (0.5, 1024, 5)


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("KILN_BATCHING", "false")
    monkeypatch.setenv("KILN_MODEL_STORE", "/from/env")
    s = load_settings(["--max-batch-size", "16", "--batching", "--store", "/from/flag", "--model", "m"])
    assert (s.max_batch_size, s.batching, s.model_store, s.model_name) == (16, True, Path("/from/flag"), "m")
    assert load_settings(["--no-batching"]).batching is False
    monkeypatch.setenv("KILN_ACCESS_LOG", "true")
    assert load_settings([]).access_log is True
    assert load_settings(["--no-access-log"]).access_log is False


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KILN_"):
            monkeypatch.delenv(name)
    s = load_settings([])
    assert s == ServerSettings()
    assert (s.model_store, s.model_name) == (Path("model_store"), "mnist")
    assert parse_args([])[1:] == ("127.0.0.1", 8080)
    monkeypatch.setenv("KILN_PORT", "tcp://10.0.0.1:8080")  # what a Service named kiln injects
    assert parse_args(["--port", "9000"])[1:] == ("127.0.0.1", 9000)
    assert (s.batching, s.max_batch_size, s.max_queue_delay_us) == (True, 64, 500)
    assert (s.poll_interval_s, s.keep_versions, s.max_body_bytes) == (2.0, 3, 16 * 1024 * 1024)
    assert s.access_log is False


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--max-batch-size", "0"], {}),
        (["--max-body-bytes", "-1"], {}),
        (["--keep-versions", "0"], {}),
        ([], {"KILN_POLL_INTERVAL_S": "often"}),
        ([], {"KILN_MAX_QUEUE_DELAY_US": "-5"}),
        (["--port", "http"], {}),
        (["--port", "70000"], {}),
    ],
)
def test_invalid_settings_are_usage_errors(monkeypatch: pytest.MonkeyPatch, argv, env) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        load_settings(argv)
    assert info.value.code == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_exits_cleanly(make_store, models, make_digits) -> None:
    root = make_store(production="1")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    # A long queue delay keeps a request in flight across the signal; the drain delay is
    # the window in which readiness is already false but requests are still served.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.serving.server", "--store", str(root), "--model", MODEL, "--port", str(port),
         "--max-queue-delay-us", "2000000", "--drain-delay-s", "1", "--poll-interval-s", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    pixels = [make_digits(2, seed=s) for s in (31, 32)]

    def infer(p) -> httpx.Response:
        body = {"inputs": [{"name": "pixels", "shape": list(p.shape), "datatype": "UINT8", "data": p.ravel().tolist()}],
                "outputs": [{"name": "label"}]}
        return httpx.post(f"{url}/v2/models/{MODEL}/infer", content=json.dumps(body), timeout=20)

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(infer, pixels[0])
            time.sleep(0.3)  # the request is now waiting in the batch queue
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
            assert ready.status_code == 503 and "shutting down" in ready.json()["error"]
            assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
            during_drain = pool.submit(infer, pixels[1])  # still served while draining
            for p, future in zip(pixels, (in_flight, during_drain), strict=True):
                response = future.result(timeout=20)
                assert response.status_code == 200, response.text
                assert response.json()["outputs"][0]["data"] == models["1"].reference(p)[1].tolist()
        assert proc.wait(timeout=20) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/v2/health/live", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert "draining" in output
