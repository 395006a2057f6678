"""Hot reload: the server follows the production alias without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.serving.predictor import ModelLoadError
from kiln.runtime import SessionSettings
from kiln.serving.errors import ApiError
from kiln.serving.repository import ModelRepository
from kiln.serving.server import create_app
from kiln.store import ModelStore

MODEL = "mnist"
WAIT_S = 10.0


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def infer(http: httpx.Client, pixels: np.ndarray, path: str = f"/v2/models/{MODEL}/infer") -> httpx.Response:
    return http.post(
        path,
        json={
            "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}],
            "outputs": [{"name": "label"}],
        },
    )


def app_for(root: Path, **kwargs):
    return create_app(root, MODEL, intra_op_threads=1, poll_interval_s=0.05, **kwargs)


def test_moving_the_alias_switches_production(make_store, serve_app, models, make_digits) -> None:
    root = make_store(production="1")
    pixels = make_digits(32, seed=11)
    expected = {v: models[v].reference(pixels)[1].tolist() for v in ("1", "2")}
    assert expected["1"] != expected["2"]
    with serve_app(app_for(root)) as running, httpx.Client(base_url=running.url, timeout=10) as http:
        first = infer(http, pixels).json()
        assert first["model_version"] == "1" and first["outputs"][0]["data"] == expected["1"]
        assert sample(http.get("/metrics").text, "kiln_model_production_version", model=MODEL) == 1

        ModelStore(root).set_alias(MODEL, "2")
        switched = wait_for(lambda: (r := infer(http, pixels).json())["model_version"] == "2" and r, "version 2")
        assert switched["outputs"][0]["data"] == expected["2"]
        assert http.get("/v2/health/ready").status_code == 200
        text = http.get("/metrics").text
        assert sample(text, "kiln_model_production_version", model=MODEL) == 2
        assert sample(text, "kiln_model_loads_total", model=MODEL, version="2", result="success") == 1
        # the old version stays loaded and addressable
        old = infer(http, pixels, f"/v2/models/{MODEL}/versions/1/infer").json()
        assert old["model_version"] == "1" and old["outputs"][0]["data"] == expected["1"]
        assert running.app.state.repository.loaded_versions() == ["2", "1"]

        # and back: rolling back is just moving the alias again
        ModelStore(root).set_alias(MODEL, "1")
        wait_for(lambda: infer(http, pixels).json()["model_version"] == "1", "version 1 again")


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(make_store, serve_app, models, make_digits) -> None:
    root = make_store(production="1", corrupt=("3",))
    pixels = make_digits(8, seed=12)
    with serve_app(app_for(root)) as running, httpx.Client(base_url=running.url, timeout=10) as http:
        ModelStore(root).set_alias(MODEL, "3")  # checksum mismatch
        failures = lambda: sample(http.get("/metrics").text, "kiln_model_loads_total", model=MODEL, version="3", result="failure")  # noqa: E731
        wait_for(failures, "the failed load to be counted")
        time.sleep(0.3)  # several more polls: a failed version is not retried in a loop
        assert failures() == 1
        response = infer(http, pixels)
        assert response.status_code == 200
        assert response.json()["model_version"] == "1"
        assert response.json()["outputs"][0]["data"] == models["1"].reference(pixels)[1].tolist()
        assert http.get("/v2/health/ready").status_code == 200
        assert sample(http.get("/metrics").text, "kiln_model_production_version", model=MODEL) == 1

        # a good version after the bad one is still picked up
        ModelStore(root).set_alias(MODEL, "2")
        wait_for(lambda: infer(http, pixels).json()["model_version"] == "2", "version 2")


def test_alias_to_a_missing_version_is_a_counted_failure(make_store, serve_app, make_digits) -> None:
    root = make_store(production="1")
    with serve_app(app_for(root)) as running, httpx.Client(base_url=running.url, timeout=10) as http:
        (root / MODEL / "production").write_text("7\n")
        wait_for(
            lambda: sample(http.get("/metrics").text, "kiln_model_loads_total", model=MODEL, version="7", result="failure"),
            "the failure to be counted",
        )
        assert infer(http, make_digits(1)).json()["model_version"] == "1"


def test_a_server_started_without_production_becomes_ready_when_the_alias_appears(make_store, serve_app, make_digits) -> None:
    root = make_store(production=None)
    with serve_app(app_for(root)) as running, httpx.Client(base_url=running.url, timeout=10) as http:
        assert http.get("/v2/health/ready").status_code == 503
        ModelStore(root).set_alias(MODEL, "2")
        wait_for(lambda: http.get("/v2/health/ready").status_code == 200, "readiness")
        assert infer(http, make_digits(1)).json()["model_version"] == "2"


def test_poll_interval_zero_turns_hot_reload_off(make_store, serve_app, make_digits) -> None:
    root = make_store(production="1")
    app = create_app(root, MODEL, intra_op_threads=1, poll_interval_s=0)
    with serve_app(app) as running, httpx.Client(base_url=running.url, timeout=10) as http:
        ModelStore(root).set_alias(MODEL, "2")
        time.sleep(0.3)
        assert infer(http, make_digits(1)).json()["model_version"] == "1"


def test_repository_keeps_the_last_n_versions_and_never_evicts_production(make_store) -> None:
    root = make_store(production="1")
    store = ModelStore(root)
    v1_onnx = store.get(MODEL, "1").onnx_path
    store.add_version(MODEL, v1_onnx, {})  # version 3, a good one
    events: list[tuple[str, bool]] = []
    repo = ModelRepository(store, MODEL, session=SessionSettings(device="cpu", intra_op_threads=1),
                           keep_versions=2, on_load=lambda v, ok: events.append((v, ok)))
    repo.load_production()
    assert repo.loaded_versions() == ["1"]
    v2 = repo.get(MODEL, "2")
    assert repo.get(MODEL, "2") is v2  # loaded once
    assert repo.loaded_versions() == ["1", "2"]
    repo.get(MODEL, "3")
    assert repo.loaded_versions() == ["1", "3"]  # 2 evicted, production kept though least recent
    assert repo.production is not None and repo.production.version == "1"
    repo.get(MODEL, "2")  # evicted versions load again on demand
    assert repo.loaded_versions() == ["1", "2"]
    assert events == [("1", True), ("2", True), ("3", True), ("2", True)]
    repo.set_production(repo.get(MODEL, "3"))
    assert repo.production.version == "3" and repo.loaded_versions() == ["1", "3"]
    repo.get(MODEL, "2")  # the old production is evictable now
    assert repo.loaded_versions() == ["3", "2"]

    with pytest.raises(ApiError) as info:
        repo.get(MODEL, "9")
    assert info.value.status_code == 404
    with pytest.raises(ModelLoadError):
        repo.load_version("9")
    assert events[-1] == ("9", False)
