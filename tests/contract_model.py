"""A small ONNX model that follows kiln.contract (uint8 pixels -> probabilities, label),
with a numpy reference, for tests outside tests/serving that need a servable model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.contract import IMAGE_SIZE, INPUT_NAME, LABEL_NAME, NUM_CLASSES, ONNX_OPSET, PROBABILITIES_NAME


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(IMAGE_SIZE * IMAGE_SIZE, NUM_CLASSES)).astype(np.float32)


def reference(weight: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, 10], label [N]) the model computes for uint8 ``pixels`` [N, 28, 28]."""
    logits = pixels.reshape(len(pixels), -1).astype(np.float32) / np.float32(255.0) @ weight
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs, probs.argmax(axis=1).astype(np.int64)


def write_contract_onnx(path: Path, weight: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "scale"], ["xs"]),
        helper.make_node("Reshape", ["xs", "flat"], ["xf"]),
        helper.make_node("MatMul", ["xf", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [PROBABILITIES_NAME], axis=1),
        helper.make_node("ArgMax", [PROBABILITIES_NAME], [LABEL_NAME], axis=1, keepdims=0),
    ]
    inits = [numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
             numpy_helper.from_array(np.array([-1, IMAGE_SIZE * IMAGE_SIZE], dtype=np.int64), "flat"),
             numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(
        nodes, "contract", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT, ["N", NUM_CLASSES]),
         helper.make_tensor_value_info(LABEL_NAME, TensorProto.INT64, ["N"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path
