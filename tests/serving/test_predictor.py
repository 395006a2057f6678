"""OnnxPredictor: checksum-verified loading, V2 metadata, validated prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.runtime import SessionSettings
from kiln.serving.predictor import PLATFORM, InferenceInputError, ModelLoadError, OnnxPredictor
from kiln.store import ModelStore

MODEL = "mnist"
ONE_THREAD = SessionSettings(intra_op_threads=1)


@pytest.fixture
def store(make_store) -> ModelStore:
    return ModelStore(make_store(production="1", corrupt=("3",)))


@pytest.fixture
def predictor(store: ModelStore) -> OnnxPredictor:
    p = OnnxPredictor(store.get(MODEL, "1"), session=ONE_THREAD)
    p.load()
    return p


def test_load_makes_ready_and_metadata_comes_from_the_graph(store: ModelStore) -> None:
    p = OnnxPredictor(store.get(MODEL, "1"), session=ONE_THREAD)
    assert not p.ready
    with pytest.raises(ModelLoadError):
        p.metadata()
    p.load()
    assert p.ready
    p.load()  # idempotent
    assert p.metadata() == {
        "name": MODEL,
        "versions": ["1"],
        "platform": PLATFORM,
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 28, 28]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }
    assert p.metadata(versions=["1", "2"])["versions"] == ["1", "2"]


def test_predict_matches_the_numpy_reference(predictor: OnnxPredictor, models, make_digits) -> None:
    pixels = make_digits(7)
    out = predictor.predict({"pixels": pixels})
    probs, labels = models["1"].reference(pixels)
    assert set(out) == {"probabilities", "label"}
    assert out["label"].dtype == np.int64 and out["label"].shape == (7,)
    np.testing.assert_array_equal(out["label"], labels)
    np.testing.assert_allclose(out["probabilities"], probs, rtol=1e-4, atol=1e-6)


def test_predict_returns_only_requested_outputs(predictor: OnnxPredictor, make_digits) -> None:
    out = predictor.predict({"pixels": make_digits(2)}, ["label"])
    assert list(out) == ["label"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"pixels": np.zeros((2, 28, 28), np.float32)}, "must be UINT8"),
        ({"pixels": np.zeros((2, 28, 27), np.uint8)}, "shape"),
        ({"pixels": np.zeros((28, 28), np.uint8)}, "shape"),
        ({}, "missing ['pixels']"),
        ({"pixels": np.zeros((1, 28, 28), np.uint8), "extra": np.zeros(1, np.uint8)}, "unexpected ['extra']"),
    ],
)
def test_predict_rejects_inputs_that_do_not_fit(predictor: OnnxPredictor, inputs, message: str) -> None:
    with pytest.raises(InferenceInputError) as info:
        predictor.predict(inputs)
    assert message in str(info.value)


def test_predict_rejects_unknown_outputs(predictor: OnnxPredictor, make_digits) -> None:
    with pytest.raises(InferenceInputError, match="unknown output"):
        predictor.predict({"pixels": make_digits(1)}, ["logits"])


def test_predict_before_load_is_an_error(store: ModelStore, make_digits) -> None:
    with pytest.raises(ModelLoadError, match="not loaded"):
        OnnxPredictor(store.get(MODEL, "1")).predict({"pixels": make_digits(1)})


def test_checksum_mismatch_refuses_to_load(store: ModelStore) -> None:
    p = OnnxPredictor(store.get(MODEL, "3"), session=ONE_THREAD)
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        p.load()
    assert not p.ready


def test_tampered_model_file_refuses_to_load(store: ModelStore) -> None:
    version = store.get(MODEL, "2")
    with open(version.onnx_path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        OnnxPredictor(version, session=ONE_THREAD).load()


def test_missing_checksum_refuses_to_load(store: ModelStore) -> None:
    version = store.get(MODEL, "1")
    meta = {k: v for k, v in version.meta.items() if k != "sha256"}
    with pytest.raises(ModelLoadError, match="no sha256"):
        OnnxPredictor(type(version)(version.model, version.version, version.path, meta)).load()


def test_invalid_onnx_with_matching_checksum_is_a_load_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"this is not a protobuf")
    version = ModelStore(tmp_path / "store").add_version(MODEL, bogus, {})
    with pytest.raises(ModelLoadError, match="cannot load") as info:
        OnnxPredictor(version, session=ONE_THREAD).load()
    assert info.value.__cause__ is not None


def test_float_inputs_must_be_finite(tmp_path: Path) -> None:
    # The contract's input is uint8; a float model exercises the NaN/inf guard.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "float_identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "f.onnx")
    p = OnnxPredictor(ModelStore(tmp_path / "store").add_version("f", tmp_path / "f.onnx", {}), session=ONE_THREAD)
    p.load()
    np.testing.assert_array_equal(p.predict({"x": np.array([[-1, 0, 2]], np.float32)})["y"], [[0, 0, 2]])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(InferenceInputError, match="NaN or infinity"):
            p.predict({"x": np.array([[0, bad, 0]], np.float32)})


def test_json_responses_carry_numbers_exactly_and_refuse_non_finite_outputs(predictor: OnnxPredictor,
                                                                            make_digits) -> None:
    import json

    from kiln.serving import codec
    from kiln.serving.predictor import InferenceError

    request = codec.InferenceRequest.model_validate({"id": "x", "inputs": [{"name": "pixels", "shape": [1],
                                                                           "datatype": "UINT8", "data": [0]}]})
    wanted = [("probabilities", False), ("label", False)]
    outputs = predictor.predict({"pixels": make_digits(3, seed=5)})
    answer = json.loads(codec.encode_response(predictor, request, wanted, outputs).body)
    assert answer["id"] == "x" and [o["shape"] for o in answer["outputs"]] == [[3, 10], [3]]
    # float32 written in its shortest form reads back as the very same float32
    np.testing.assert_array_equal(np.array(answer["outputs"][0]["data"], np.float32).reshape(3, 10),
                                  outputs["probabilities"])
    assert answer["outputs"][1]["data"] == outputs["label"].tolist()
    outputs["probabilities"][1, 2] = np.nan
    with pytest.raises(InferenceError, match="'probabilities' contains NaN or infinity"):
        codec.encode_response(predictor, request, wanted, outputs)
