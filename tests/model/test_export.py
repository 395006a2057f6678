"""kiln.export: a valid, self-contained, contract-shaped ONNX file that matches PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

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
from kiln.checkpoint import read_checkpoint


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
    best = next(row for row in trained.result.history if row["epoch"] == trained.result.best_epoch)
    assert json.loads(meta["train_metrics"]) == {"best_epoch": trained.result.best_epoch, "val_loss": best["val_loss"],
                                                 "val_accuracy": best["val_accuracy"]}
    for key, value in exported.metadata.items():  # data_version, and git_commit given by the caller
        assert meta[key] == value


def test_git_commit_defaults_to_the_code_version(trained, tables, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KILN_GIT_COMMIT", "cafef00d")
    export_onnx(trained.checkpoint, tmp_path / "m.onnx", tables.val.head(16), {"data_version": "v"})
    assert read_metadata(tmp_path / "m.onnx")["git_commit"] == "cafef00d"


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


# --------------------------------------------------------------------------- variants


@pytest.fixture(scope="module")
def variants(exported, tables, tmp_path_factory):
    from kiln.export import export_variants

    out = tmp_path_factory.mktemp("variants")
    # as the pipeline does: scored on validation, calibrated on training images, no test data
    return out, export_variants(exported.onnx_path, out, tables.val, calibration_df=tables.train)


def test_variants_are_scored_and_ship_only_within_the_accuracy_budget(variants, exported, tables) -> None:
    import json

    from kiln.evaluate import predict_onnx

    out, report = variants
    pixels, labels = to_arrays(tables.val)
    base_pred = predict_onnx(exported.onnx_path, pixels)[1]
    base_acc = float(np.mean(base_pred == labels))
    assert report["baseline"]["accuracy"] == pytest.approx(base_acc) and report["n"] == len(labels)
    assert set(report["variants"]) == {"int8", "fp16"}
    for name, v in report["variants"].items():
        # the decision follows the recorded drop: ship iff drop <= 0.3 points
        assert v["ships"] == (v["accuracy_drop"] <= 0.003 + 1e-12), (name, v)
        assert v["label_agreement"] >= 0.97, (name, v)  # a broken conversion would disagree wildly
        assert v["bytes"] < report["baseline"]["bytes"]
        file = out / f"{exported.onnx_path.stem}.{name}.onnx"
        if v["ships"]:
            assert Path(v["path"]) == file and file.is_file()
            check_onnx_contract(onnx.load(str(file)))  # same interface as the fp32 model
            acc = float(np.mean(predict_onnx(file, pixels)[1] == labels))
            assert v["accuracy"] == pytest.approx(acc)
            assert v["accuracy_drop"] == pytest.approx(base_acc - acc)
        else:
            assert v["path"] is None and not file.exists()
    assert report["variants"]["fp16"]["ships"]  # fp16 of a small CNN is practically lossless
    assert report["variants"]["int8"]["bytes"] < 0.4 * report["baseline"]["bytes"]
    assert json.loads((out / "variants.json").read_text()) == json.loads(json.dumps(report))


def test_int8_variants_quantise_the_convolutions(variants, exported, tables, tmp_path) -> None:
    from kiln.export import export_variants

    # static QDQ (the default int8): every Conv / Gemm weight goes through an int8 DequantizeLinear
    static = export_variants(exported.onnx_path, tmp_path, tables.val.head(50), max_drop=1.0, variants=("int8",),
                             calibration_df=tables.train)
    assert static["variants"]["int8"]["method"].endswith("MinMax calibration on 256 images)")  # one method, not two
    graph = onnx.load(static["variants"]["int8"]["path"]).graph
    int8_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dq_of_int8 = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 4 and all(n.input[1] in dq_of_int8 for n in weighted)
    # dynamic: integer kernels
    dynamic = export_variants(exported.onnx_path, tmp_path, tables.val.head(50), max_drop=1.0, variants=("int8_dynamic",))
    ops = {n.op_type for n in onnx.load(dynamic["variants"]["int8_dynamic"]["path"]).graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= ops and "Conv" not in ops


def test_variant_over_the_budget_does_not_ship(exported, tables, tmp_path) -> None:
    from kiln.export import export_variants

    # a negative budget cannot be met even by a lossless variant
    report = export_variants(exported.onnx_path, tmp_path, tables.val, max_drop=-0.01, variants=("fp16",))
    v = report["variants"]["fp16"]
    assert not v["ships"] and v["path"] is None and v["accuracy_drop"] is not None
    assert v["reason"].startswith("accuracy drop") and ">" in v["reason"]
    assert not list(tmp_path.glob("*.fp16.onnx"))


def test_missing_converter_is_recorded_not_raised(exported, tables, tmp_path, monkeypatch) -> None:
    import sys

    from kiln.export import export_variants

    monkeypatch.setitem(sys.modules, "onnxruntime.transformers.float16", None)  # import now fails
    report = export_variants(exported.onnx_path, tmp_path, tables.val.head(50), variants=("fp16",))
    v = report["variants"]["fp16"]
    assert not v["ships"] and v["reason"].startswith("converter not available")
    with pytest.raises(ValueError, match="unknown variant"):
        export_variants(exported.onnx_path, tmp_path, tables.val, variants=("int4",))


# --------------------------------------------------------------------------- the export component


def test_export_component_reads_train_and_val_never_test(trained, tables, tmp_path) -> None:
    """The KFP adapter, called with real artifact objects: parity and variant choice run
    on the validation split, int8 calibration on training images; there is no test input."""
    import inspect

    from kfp.dsl import Dataset, Model

    from components.export import export

    assert "test_set" not in inspect.signature(export).parameters
    paths = {}
    for name in ("train", "val"):
        paths[name] = tmp_path / f"{name}.parquet"
        getattr(tables, name).to_parquet(paths[name])
    checkpoint = Model(name="checkpoint", uri=str(trained.checkpoint))
    onnx_model = Model(name="onnx_model", uri=str(tmp_path / "out" / "model.onnx"))
    variant_dir = Model(name="variants", uri=str(tmp_path / "out" / "variants"))
    export(checkpoint, Dataset(name="train_set", uri=str(paths["train"])), Dataset(name="val_set", uri=str(paths["val"])),
           "md5:feed", onnx_model, variant_dir)
    assert read_metadata(onnx_model.path)["data_version"] == "md5:feed"
    assert onnx_model.metadata["parity_max_abs_diff"] <= 1e-4
    summary = json.loads((Path(variant_dir.path) / "variants.json").read_text())
    assert summary["n"] == len(tables.val)  # scored on validation
    assert summary["variants"]["int8"]["method"].endswith("calibration on 256 images)")  # from the 1,000 training
    assert variant_dir.metadata["fp16_ships"] == summary["variants"]["fp16"]["ships"]
