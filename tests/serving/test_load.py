"""Bounded load tests: concurrency 64 for 30 s with zero errors, and a few seconds across hot reloads."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.serving.server import create_app
from kiln.store import ModelStore

pytestmark = pytest.mark.load

MODEL = "mnist"
CONCURRENCY = 64
DURATION_S = 4.0
LOAD_S = 30.0  # the plain load test: 30 s at concurrency 64


async def load(url: str, requests: list[tuple[bytes, dict[str, list[int]]]], duration_s: float, during=None) -> dict:
    """Hammer ``url`` with ``requests`` (body, expected labels by version) from CONCURRENCY clients.

    Returns counts of statuses, versions seen, wrong answers and client-side exceptions.
    ``during`` (an async callable) runs alongside the load.
    """
    stats = {"status": Counter(), "versions": Counter(), "wrong": 0, "exceptions": []}
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(i: int) -> None:
            n = i
            while time.monotonic() < deadline:
                content, expected = requests[n % len(requests)]
                n += CONCURRENCY
                try:
                    response = await client.post(f"/v2/models/{MODEL}/infer", content=content)
                except httpx.HTTPError as e:
                    stats["exceptions"].append(repr(e))
                    continue
                stats["status"][response.status_code] += 1
                if response.status_code == 200:
                    payload = response.json()
                    version = payload["model_version"]
                    stats["versions"][version] += 1
                    if payload["outputs"][0]["data"] != expected[version]:
                        stats["wrong"] += 1

        tasks = [worker(i) for i in range(CONCURRENCY)]
        if during is not None:
            tasks.append(during())
        await asyncio.gather(*tasks)
    return stats


def requests_for(models, make_digits, n: int = 16) -> list[tuple[bytes, dict[str, list[int]]]]:
    out = []
    for i in range(n):
        pixels = make_digits(1 + i % 4, seed=900 + i)
        body = json.dumps(
            {
                "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}],
                "outputs": [{"name": "label"}],
            }
        ).encode()
        out.append((body, {v: m.reference(pixels)[1].tolist() for v, m in models.items()}))
    return out


def test_load_at_concurrency_64_has_zero_errors(make_store, serve_app, models, make_digits) -> None:
    root = make_store(production="1")
    app = create_app(root, MODEL, intra_op_threads=1, poll_interval_s=0)
    probes: list[tuple[int, float]] = []

    async def probe() -> None:
        # Health probes on their own connection keep answering, and quickly, under load.
        async with httpx.AsyncClient(base_url=running.url, timeout=5) as client:
            for _ in range(int(LOAD_S / 0.25) - 1):
                await asyncio.sleep(0.25)
                start = time.monotonic()
                response = await client.get("/v2/health/ready")
                probes.append((response.status_code, time.monotonic() - start))

    with serve_app(app) as running:
        stats = asyncio.run(load(running.url, requests_for(models, make_digits), LOAD_S, during=probe))
    assert len(probes) >= 100 and {code for code, _ in probes} == {200}
    assert max(t for _, t in probes) < 1.0, probes
    assert stats["exceptions"] == []
    assert set(stats["status"]) == {200}, stats["status"]
    assert stats["wrong"] == 0
    assert stats["status"][200] > CONCURRENCY  # every client got through more than once
    assert set(stats["versions"]) == {"1"}


def test_hot_reload_under_load_fails_no_request(make_store, serve_app, models, make_digits) -> None:
    root: Path = make_store(production="1")
    store = ModelStore(root)
    app = create_app(root, MODEL, intra_op_threads=1, poll_interval_s=0.05, keep_versions=1)
    switches: list[str] = []

    async def flip() -> None:
        # 1 -> 2 -> 1 -> 2 while the load runs; keep_versions=1 makes every switch a real
        # load of a version that was unloaded, and retires the one still finishing requests.
        for version in ("2", "1", "2"):
            await asyncio.sleep(DURATION_S / 4)
            await asyncio.to_thread(store.set_alias, MODEL, version)
            switches.append(version)

    with serve_app(app) as running:
        stats = asyncio.run(load(running.url, requests_for(models, make_digits), DURATION_S, during=flip))
        final = httpx.get(f"{running.url}/metrics").text
    assert switches == ["2", "1", "2"]
    assert stats["exceptions"] == []
    assert set(stats["status"]) == {200}, stats["status"]
    assert stats["wrong"] == 0  # every answer is right for the version it names
    assert set(stats["versions"]) == {"1", "2"}, stats["versions"]
    loads = Counter()
    for family in text_string_to_metric_families(final):
        for sample in family.samples:
            if sample.name == "kiln_model_loads_total":
                loads[sample.labels["result"]] += sample.value
    # 1 at startup, then 2, 1 (unloaded by keep_versions=1, so loaded again) and 2 again
    assert loads == {"success": 4}
