"""The gru and transformer families through the same gates as the CNN: config checks,
a dynamic batch, one self-contained opset-18 ONNX file with the contract, the parity
gate at batch 1 and 64, the variant rule, and champion/challenger across families.

Each family is trained once per session for 2 epochs on 300 digits: these tests are
about the export contract and parity, not accuracy (the README has the real figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kiln.checkpoint import load_checkpoint
from kiln.contract import IMAGE_SIZE, NUM_CLASSES, ONNX_OPSET
from kiln.dataset import to_arrays
from kiln.evaluate import Thresholds, evaluate_onnx
from kiln.export import MAX_VARIANT_ACCURACY_DROP, check_onnx_contract, check_parity, export_onnx, export_variants
from kiln.models import FAMILIES, MODEL_TYPES, PatchTransformer, RowGRU, build_model, predict_proba
from kiln.runtime import predict
from kiln.train import TrainConfig, train

pytestmark = pytest.mark.slow  # trains and exports every family

NEW_FAMILIES = ("gru", "transformer")


@dataclass(frozen=True)
class FamilyModel:
    config: TrainConfig
    checkpoint: Path
    onnx_path: Path


@pytest.fixture(scope="session")
def family_models(tables, tmp_path_factory: pytest.TempPathFactory) -> dict[str, FamilyModel]:
    """Each new family trained for 2 epochs on 300 digits and exported (parity gate on the 200 validation digits)."""
    out = {}
    for family in NEW_FAMILIES:
        tmp = tmp_path_factory.mktemp(family)
        config = TrainConfig(model=family, epochs=2, batch_size=32, device="cpu", seed=0)
        train(config, tables.train.iloc[:300], tables.val, tmp / "model.pt", log=lambda _: None)
        export_onnx(tmp / "model.pt", tmp / "model.onnx", tables.val, {"data_version": "md5:test"})
        out[family] = FamilyModel(config, tmp / "model.pt", tmp / "model.onnx")
    return out


def test_every_family_is_registered_and_offered() -> None:
    assert set(NEW_FAMILIES) <= set(FAMILIES) and MODEL_TYPES == tuple(FAMILIES)
    assert TrainConfig().model == "cnn"  # the CNN stays the default
    for family in MODEL_TYPES:
        assert TrainConfig(model=family).model == family


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gru_hidden_size": 0}, "TrainConfig.gru_hidden_size must be a positive int, got 0"),
        ({"gru_layers": 1.5}, "TrainConfig.gru_layers must be a positive int, got 1.5"),
        ({"patch_size": 5}, "TrainConfig.patch_size must be a divisor of 28"),
        ({"d_model": 60, "heads": 8}, "TrainConfig.d_model must be a multiple of 4 (sine-cosine positions) and of heads=8, got 60"),
        ({"d_model": 66, "heads": 2}, "TrainConfig.d_model must be a multiple of 4"),
        ({"stem_channels": -1}, "TrainConfig.stem_channels must be a non-negative int, got -1"),
        ({"heads": True}, "TrainConfig.heads must be a positive int, got True"),
        ({"encoder_layers": -1}, "TrainConfig.encoder_layers must be a positive int, got -1"),
    ],
)
def test_size_fields_are_checked_with_one_line_errors(fields, message) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(**fields)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_size_fields_shape_the_networks() -> None:
    small = build_model(TrainConfig(model="gru", gru_hidden_size=16, gru_layers=2))
    assert isinstance(small, RowGRU) and (small.gru.hidden_size, small.gru.num_layers) == (16, 2)
    vit = build_model(TrainConfig(model="transformer", patch_size=7, d_model=32, heads=2, encoder_layers=2,
                                  stem_channels=0))
    assert isinstance(vit, PatchTransformer) and len(vit.blocks) == 2 and vit.position.shape == (1, 16, 32)
    assert isinstance(vit.stem, torch.nn.Identity) and vit.embed.in_channels == 1  # a plain ViT
    for net in (small, vit):
        net.eval()
        for n in (1, 5):  # the batch is never baked in
            assert net(torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE)).shape == (n, NUM_CLASSES)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_export_is_one_contract_file_at_opset_18(family_models, family) -> None:
    path = family_models[family].onnx_path
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.pt"]  # no external data
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    check_onnx_contract(model)  # pixels uint8 [N,28,28] -> probabilities, label; dynamic N
    assert {o.domain: o.version for o in model.opset_import}[""] >= ONNX_OPSET >= 18
    assert {"Cast", "Div", "Sub"} <= {node.op_type for node in model.graph.node}  # normalisation is inside


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_parity_gate_passes_at_batch_1_and_64(family_models, tables, family) -> None:
    m = family_models[family]
    report = check_parity(m.checkpoint, m.onnx_path, tables.val, atol=1e-4, batch_sizes=(1, 64))
    assert report.max_abs_diff <= 1e-4 and report.n_label_disagreements == 0 and report.batch_sizes == (1, 64)
    pixels, _ = to_arrays(tables.val)
    _, net = load_checkpoint(m.checkpoint)
    torch_p = predict_proba(net, pixels)
    for size in (1, 64):  # and every row of a batch is answered as if it came alone
        probabilities, label = predict(m.onnx_path, pixels[:64], batch_size=size)
        np.testing.assert_allclose(probabilities, torch_p[:64], atol=1e-4)
        np.testing.assert_array_equal(label, torch_p[:64].argmax(axis=1))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_variants_ship_only_under_the_accuracy_rule(family_models, tables, family, tmp_path) -> None:
    m = family_models[family]
    report = export_variants(m.onnx_path, tmp_path, tables.val, calibration_df=tables.train)
    for name, v in report["variants"].items():
        assert v["accuracy_drop"] is not None, f"{family} {name} failed to build: {v['reason']}"
        assert v["ships"] == (v["accuracy_drop"] <= MAX_VARIANT_ACCURACY_DROP + 1e-12), v
        assert (tmp_path / f"model.{name}.onnx").exists() == v["ships"]
        if v["ships"]:
            check_onnx_contract(onnx.load(v["path"]))
            probabilities, label = predict(v["path"], to_arrays(tables.val)[0][:64])
            assert probabilities.shape == (64, NUM_CLASSES) and label.dtype == np.int64


def test_gru_challenger_is_compared_with_a_cnn_champion_on_the_same_test_split(family_models, exported, tables) -> None:
    gru = family_models["gru"].onnx_path
    _, y = to_arrays(tables.test)
    own = {path: float(np.mean(predict(path, to_arrays(tables.test)[0])[1] == y)) for path in (gru, exported.onnx_path)}
    lenient = Thresholds(min_accuracy=0.0, min_macro_recall=0.0, min_class_recall=0.0)
    evaluation = evaluate_onnx(gru, tables.test, lenient, champion_onnx_path=exported.onnx_path, tolerance=0.0)
    assert evaluation.accuracy == pytest.approx(own[gru])
    assert evaluation.champion["accuracy"] == pytest.approx(own[exported.onnx_path]) and evaluation.champion["n"] == len(y)
    assert evaluation.blessed == (own[gru] >= own[exported.onnx_path])
    # the other way round too: a CNN challenger against a GRU champion
    reverse = evaluate_onnx(exported.onnx_path, tables.test, lenient, champion_onnx_path=gru, tolerance=1.0)
    assert reverse.blessed and reverse.champion["accuracy_delta"] == pytest.approx(own[exported.onnx_path] - own[gru])
