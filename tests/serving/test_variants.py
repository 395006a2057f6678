"""Serving a stored int8/fp16 variant instead of the fp32 model (``--variant``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from kiln.runtime import SessionSettings
from kiln.serving.predictor import ModelLoadError, OnnxPredictor
from kiln.serving.server import create_app, parse_args
from kiln.store import ModelStore

MODEL = "mnist"


def _store(tmp_path: Path, models, seeded) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    work = tmp_path / "work"
    work.mkdir()
    v1 = models["1"].write_onnx(work / "v1.onnx")
    variant = seeded.write_onnx(work / "v1.int8.onnx")
    store.add_version(MODEL, v1, {}, variants={"int8": (variant, {"accuracy_drop": 0.001})})
    store.add_version(MODEL, models["2"].write_onnx(work / "v2.onnx"), {})
    store.set_alias(MODEL, "1")
    return store


@pytest.fixture
def variant_model(models):
    # a third set of weights, distinct from versions 1 and 2
    return type(models["1"]).seeded(7)


def _infer(client: httpx.Client, path: str, pixels: np.ndarray) -> list[int]:
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}], "outputs": [{"name": "label"}]}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"]


def test_server_serves_the_variant_where_a_version_has_one(tmp_path, models, variant_model, make_digits,
                                                          serve_app) -> None:
    store = _store(tmp_path, models, variant_model)
    pixels = make_digits(32, seed=5)
    expected_variant = variant_model.reference(pixels)[1].tolist()
    assert expected_variant != models["1"].reference(pixels)[1].tolist()  # the test can tell them apart
    app = create_app(store.root, MODEL, intra_op_threads=1, poll_interval_s=0, variant="int8")
    with serve_app(app) as running, httpx.Client(base_url=running.url) as client:
        assert _infer(client, "/v2/models/mnist/infer", pixels) == expected_variant
        # version 2 shipped no int8 variant: its fp32 model answers
        assert _infer(client, "/v2/models/mnist/versions/2/infer", pixels) == models["2"].reference(pixels)[1].tolist()
    app = create_app(store.root, MODEL, intra_op_threads=1, poll_interval_s=0)  # default: fp32
    with serve_app(app) as running, httpx.Client(base_url=running.url) as client:
        assert _infer(client, "/v2/models/mnist/infer", pixels) == models["1"].reference(pixels)[1].tolist()


def test_a_tampered_variant_is_refused(tmp_path, models, variant_model) -> None:
    store = _store(tmp_path, models, variant_model)
    version = store.get(MODEL, "1")
    path, sha = version.model_file("int8")
    assert path.name == "model.int8.onnx" and json.loads((version.path / "model.json").read_text())[
        "variants"]["int8"] == {"accuracy_drop": 0.001, "file": "model.int8.onnx", "sha256": sha}
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="checksum mismatch.*model.int8.onnx"):
        OnnxPredictor(version, session=SessionSettings(intra_op_threads=1), variant="int8").load()
    fallback = OnnxPredictor(store.get(MODEL, "2"), session=SessionSettings(intra_op_threads=1), variant="int8")
    fallback.load()
    assert fallback.served_file.name == "model.onnx"


def test_variant_and_device_flags(monkeypatch) -> None:
    monkeypatch.setenv("KILN_VARIANT", "fp16")
    settings, _, _ = parse_args(["--device", "cpu"])
    assert (settings.variant, settings.device) == ("fp16", "cpu")
    assert parse_args(["--variant", "int8"])[0].variant == "int8"
    with pytest.raises(SystemExit):
        parse_args(["--variant", "int4"])
    monkeypatch.setenv("KILN_DEVICE", "tpu")
    with pytest.raises(SystemExit):
        parse_args([])
