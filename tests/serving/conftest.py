"""Fixtures for the model server tests: a tiny contract-conforming ONNX model, a model
store holding versions of it, and the real server on a loopback port.

The model is a linear classifier with fixed weights (seeded), so every test can compute
the exact expected output with numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.contract import IMAGE_SIZE, INPUT_NAME, LABEL_NAME, NUM_CLASSES, ONNX_OPSET, PROBABILITIES_NAME
from helpers import RunningServer, serve
from kiln.serving.server import create_app
from kiln.store import ModelStore

MODEL = "mnist"
SERVER_MAX_BODY = 256 * 1024  # small, so the 413 tests need no large bodies


@dataclass(frozen=True)
class LinearModel:
    """Weights of the test model and its numpy reference implementation."""

    weight: np.ndarray  # float32 [784, 10]
    bias: np.ndarray  # float32 [10]

    @classmethod
    def seeded(cls, seed: int) -> LinearModel:
        rng = np.random.default_rng(seed)
        return cls(
            rng.normal(size=(IMAGE_SIZE * IMAGE_SIZE, NUM_CLASSES)).astype(np.float32),
            rng.normal(size=NUM_CLASSES).astype(np.float32),
        )

    def reference(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities float32 [N, 10], label int64 [N]) for uint8 ``pixels`` [N, 28, 28]."""
        x = pixels.reshape(len(pixels), -1).astype(np.float32) / np.float32(255.0)
        logits = x @ self.weight + self.bias
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return probs, probs.argmax(axis=1).astype(np.int64)

    def write_onnx(self, path: Path) -> Path:
        """Save the model following kiln.contract: uint8 pixels -> probabilities, label."""
        nodes = [
            helper.make_node("Cast", [INPUT_NAME], ["x_float"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["x_float", "scale"], ["x_scaled"]),
            helper.make_node("Reshape", ["x_scaled", "flat_shape"], ["x_flat"]),
            helper.make_node("MatMul", ["x_flat", "weight"], ["x_mm"]),
            helper.make_node("Add", ["x_mm", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [PROBABILITIES_NAME], axis=1),
            helper.make_node("ArgMax", [PROBABILITIES_NAME], [LABEL_NAME], axis=1, keepdims=0),
        ]
        initializers = [
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([-1, IMAGE_SIZE * IMAGE_SIZE], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(self.weight, "weight"),
            numpy_helper.from_array(self.bias, "bias"),
        ]
        graph = helper.make_graph(
            nodes,
            "kiln_test_linear",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE])],
            [
                helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT, ["N", NUM_CLASSES]),
                helper.make_tensor_value_info(LABEL_NAME, TensorProto.INT64, ["N"]),
            ],
            initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
        model.ir_version = 9  # what every ONNX Runtime of the last years reads
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, path)
        return path


MODELS = {"1": LinearModel.seeded(1), "2": LinearModel.seeded(2)}
"""Weights of versions 1 and 2 in the stores the fixtures build."""


def digits(n: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 batch [n, 28, 28]."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)


def build_store(root: Path, work: Path, *, production: str | None, corrupt: tuple[str, ...] = ()) -> Path:
    """A store with versions 1 and 2 of MODEL (and a version 3 per ``corrupt``).

    ``production`` is the version the alias points at (None: no alias). A version in
    ``corrupt`` gets a model.json whose sha256 does not match its model.onnx.
    """
    store = ModelStore(root)
    work.mkdir(parents=True, exist_ok=True)
    for version, model in MODELS.items():
        stored = store.add_version(MODEL, model.write_onnx(work / f"v{version}.onnx"), {"note": f"test v{version}"})
        assert stored.version == version
    for version in corrupt:
        stored = store.add_version(MODEL, MODELS["1"].write_onnx(work / "corrupt.onnx"), {})
        assert stored.version == version
        meta_path = stored.path / "model.json"
        meta = json.loads(meta_path.read_text())
        meta["sha256"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
    if production is not None:
        store.set_alias(MODEL, production)
    return root




@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions 1 (production) and 2, and version 3 whose checksum does not match."""
    tmp = tmp_path_factory.mktemp("store")
    return build_store(tmp / "models", tmp / "work", production="1", corrupt=("3",))


@pytest.fixture(scope="session")
def server(store_root: Path) -> Iterator[RunningServer]:
    """The server over ``store_root`` with a SERVER_MAX_BODY byte body limit."""
    with serve(create_app(store_root, MODEL, max_body_bytes=SERVER_MAX_BODY, intra_op_threads=1)) as running:
        yield running


@pytest.fixture(scope="session")
def unready_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server whose store has versions but no production alias."""
    tmp = tmp_path_factory.mktemp("unready")
    root = build_store(tmp / "models", tmp / "work", production=None)
    with serve(create_app(root, MODEL, intra_op_threads=1)) as running:
        yield running


# Test modules are imported with --import-mode=importlib and cannot import this conftest,
# so the helpers reach them as fixtures.


@pytest.fixture(scope="session")
def models() -> dict[str, LinearModel]:
    """Weights (and numpy reference) of each stored version, by version."""
    return MODELS


@pytest.fixture(scope="session")
def make_digits():
    """``make_digits(n, seed=0)``: a deterministic uint8 batch [n, 28, 28]."""
    return digits


@pytest.fixture
def make_store(tmp_path: Path):
    """``make_store(production=..., corrupt=...)``: a fresh store under tmp_path (see build_store)."""

    def make(*, production: str | None, corrupt: tuple[str, ...] = ()) -> Path:
        return build_store(tmp_path / "models", tmp_path / "work", production=production, corrupt=corrupt)

    return make


@pytest.fixture(scope="session")
def serve_app():
    """``with serve_app(app) as running:`` runs an app on a free loopback port."""
    return serve
