"""kiln.export: a valid, self-contained, contract-shaped ONNX file that matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln import export as export_mod
from kiln.contract import CLASS_LABELS, INPUT_NAME, LABEL_NAME, NUM_CLASSES, ONNX_OPSET, PROBABILITIES_NAME
from kiln.dataset import to_arrays
from kiln.export import ExportError, ExportParityError, check_onnx_contract, check_parity, export_onnx, read_metadata
from kiln.train import read_checkpoint


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_passes_checker_and_is_self_contained(exported) -> None:
    model = onnx.load(str(exported.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert [p.name for p in exported.onnx_path.parent.iterdir()] == ["model.onnx"]  # no .data, no temp files
    assert model.graph.initializer and all(
        t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )
    assert {o.domain: o.version for o in model.opset_import}.get("") == ONNX_OPSET


def test_graph_interface_follows_the_contract(exported) -> None:
    model = onnx.load(str(exported.onnx_path))
    check_onnx_contract(model)  # raises if not

    def signature(value):
        tt = value.type.tensor_type
        return value.name, tt.elem_type, [d.dim_value or d.dim_param for d in tt.shape.dim]

    (inp,) = model.graph.input
    name, dtype, (batch, *rest) = signature(inp)
    assert (name, dtype, rest) == (INPUT_NAME, onnx.TensorProto.UINT8, [28, 28])
    assert isinstance(batch, str)  # symbolic: dynamic batch
    probs, label = (signature(o) for o in model.graph.output)
    assert (probs[0], probs[1], probs[2][1:]) == (PROBABILITIES_NAME, onnx.TensorProto.FLOAT, [NUM_CLASSES])
    assert (label[0], label[1], len(label[2])) == (LABEL_NAME, onnx.TensorProto.INT64, 1)


def test_contract_check_rejects_a_renamed_input(exported) -> None:
    model = onnx.load(str(exported.onnx_path))
    model.graph.input[0].name = "image"
    with pytest.raises(ExportError, match="inputs are image:uint8"):
        check_onnx_contract(model)


@pytest.mark.parametrize("batch", [1, 7, 1024])
def test_dynamic_batch_runs_in_onnxruntime(exported, tables, batch: int) -> None:
    pixels, _ = to_arrays(tables.val)
    x = np.resize(pixels, (batch, 28, 28))
    probabilities, label = _session(exported.onnx_path).run([PROBABILITIES_NAME, LABEL_NAME], {INPUT_NAME: x})
    assert probabilities.dtype == np.float32 and probabilities.shape == (batch, NUM_CLASSES)
    assert label.dtype == np.int64 and label.shape == (batch,)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(label, probabilities.argmax(axis=1))


def test_metadata_props_describe_the_model(exported, trained) -> None:
    meta = read_metadata(exported.onnx_path)
    assert json.loads(meta["train_config"]) == trained.config.to_dict()
    assert json.loads(meta["class_labels"]) == list(CLASS_LABELS)
    assert meta["kiln_version"] == kiln.__version__
    assert meta["onnx_opset"] == str(ONNX_OPSET)
    for key, value in exported.metadata.items():
        assert meta[key] == value


def test_parity_report(exported, tables) -> None:
    report = exported.report
    assert report.opset == ONNX_OPSET
    assert report.n_checked == len(tables.val)
    assert 0 <= report.max_abs_diff <= 1e-4
    assert report.label_agreement == 1.0 and report.n_label_disagreements == 0
    assert report.batch_sizes == (1, 7, 1024)


def test_parity_gate_catches_a_checkpoint_that_does_not_match(exported, trained, tables, tmp_path) -> None:
    ckpt = read_checkpoint(trained.checkpoint)
    state = dict(ckpt["state_dict"])
    # Push every image towards class 0 by more than any real logit gap.
    last_bias = [k for k in state if k.endswith("bias")][-1]
    state[last_bias] = state[last_bias].clone()
    state[last_bias][0] += 100.0
    torch.save({**ckpt, "state_dict": state}, tmp_path / "perturbed.pt")
    # Now every label is 0, so exactly the images the ONNX model does not call 0 disagree.
    (onnx_labels,) = _session(exported.onnx_path).run([LABEL_NAME], {INPUT_NAME: to_arrays(tables.val)[0]})
    n_not_zero = int(np.sum(onnx_labels != 0))
    assert n_not_zero > len(tables.val) // 2

    with pytest.raises(ExportParityError, match=rf"{n_not_zero} of {len(tables.val)} labels disagree") as info:
        check_parity(tmp_path / "perturbed.pt", exported.onnx_path, tables.val)
    assert "max |probability difference|" in str(info.value)

    # A tiny weight change moves probabilities but no labels: the atol still catches it.
    state[last_bias] = ckpt["state_dict"][last_bias] + 1e-2
    state[last_bias][0] -= 2e-2
    torch.save({**ckpt, "state_dict": state}, tmp_path / "nudged.pt")
    with pytest.raises(ExportParityError, match="allowed 0.0001"):
        check_parity(tmp_path / "nudged.pt", exported.onnx_path, tables.val)


def test_export_writes_nothing_when_parity_fails(trained, tables, tmp_path, monkeypatch) -> None:
    real_export = export_mod._export_proto

    def export_a_different_model(serving):
        with torch.no_grad():
            serving.net.classifier[-1].bias[3] += 50.0  # the graph no longer matches the checkpoint
        return real_export(serving)

    monkeypatch.setattr(export_mod, "_export_proto", export_a_different_model)
    target = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportParityError):
        export_onnx(trained.checkpoint, target, tables.val, {})
    assert list((tmp_path / "out").iterdir()) == []


def test_export_rejects_reserved_or_non_string_metadata(trained, tables, tmp_path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        export_onnx(trained.checkpoint, tmp_path / "m.onnx", tables.val, {"train_config": "{}"})
    with pytest.raises(ValueError, match="str to str"):
        export_onnx(trained.checkpoint, tmp_path / "m.onnx", tables.val, {"epochs": 3})  # type: ignore[dict-item]
    assert not (tmp_path / "m.onnx").exists()
