"""kiln.evaluate: metrics from sklearn on ONNX Runtime predictions, and the blessing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from kiln.contract import CLASS_LABELS, INPUT_NAME, LABEL_NAME
from kiln.dataset import to_arrays
from kiln.evaluate import EvaluationError, Thresholds, evaluate_onnx, onnx_providers

PERMISSIVE = Thresholds(min_accuracy=0.0, min_macro_recall=0.0, min_class_recall=0.0)


@pytest.fixture(scope="module")
def evaluation(exported, tables):
    return evaluate_onnx(exported.onnx_path, tables.test, PERMISSIVE)


def test_predictions_are_the_onnx_models_in_table_order(evaluation, exported, tables) -> None:
    pixels, labels = to_arrays(tables.test)
    session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run([LABEL_NAME], {INPUT_NAME: pixels})
    preds = evaluation.predictions
    assert list(preds.columns[:3]) == ["id", "label", "predicted"]
    assert preds["id"].tolist() == tables.test["id"].tolist()
    np.testing.assert_array_equal(preds["label"], labels)
    np.testing.assert_array_equal(preds["predicted"], expected)
    assert ((preds["confidence"] > 0) & (preds["confidence"] <= 1)).all()


def test_metrics_equal_sklearn_on_the_predictions(evaluation) -> None:
    y, p = evaluation.predictions["label"], evaluation.predictions["predicted"]
    labels = list(range(10))
    precision, recall, f1, _ = precision_recall_fscore_support(y, p, labels=labels, average="macro", zero_division=0)
    per_class = precision_recall_fscore_support(y, p, labels=labels, average=None, zero_division=0)[1]
    assert evaluation.n == len(y)
    assert evaluation.accuracy == pytest.approx(accuracy_score(y, p))
    assert evaluation.accuracy == pytest.approx(float(np.mean(y == p)))
    assert (evaluation.precision_macro, evaluation.recall_macro, evaluation.f1_macro) == pytest.approx(
        (precision, recall, f1)
    )
    assert list(evaluation.per_class_recall.values()) == pytest.approx(per_class.tolist())
    assert evaluation.confusion_matrix == confusion_matrix(y, p, labels=labels).tolist()
    assert evaluation.labels == list(CLASS_LABELS) == list(evaluation.per_class_recall)


def test_confusion_matrix_is_consistent(evaluation) -> None:
    matrix = np.array(evaluation.confusion_matrix)
    assert matrix.shape == (10, 10)
    assert matrix.sum() == evaluation.n
    assert np.trace(matrix) == round(evaluation.accuracy * evaluation.n)
    assert matrix.sum(axis=1).tolist() == list(evaluation.support.values())


def test_permissive_thresholds_bless_and_record_every_check(evaluation) -> None:
    assert evaluation.blessed
    assert evaluation.reasons and all(r.startswith("PASS") for r in evaluation.reasons)
    assert sum("min_class_recall" in r for r in evaluation.reasons) == 10
    assert any("min_accuracy" in r for r in evaluation.reasons)
    assert any("min_macro_recall" in r for r in evaluation.reasons)


def test_threshold_above_observed_accuracy_blocks_blessing(evaluation, exported, tables) -> None:
    required = min(1.0, evaluation.accuracy + 0.01)
    assert required > evaluation.accuracy  # the tiny model is not perfect
    strict = Thresholds(min_accuracy=required, min_macro_recall=0.0, min_class_recall=0.0)
    result = evaluate_onnx(exported.onnx_path, tables.test, strict)
    assert not result.blessed
    failed = [r for r in result.reasons if r.startswith("FAIL")]
    assert failed == [f"FAIL min_accuracy: accuracy {evaluation.accuracy:.4f} < {required:.4f}"]


def test_worst_class_recall_threshold(evaluation, exported, tables) -> None:
    worst_label, worst = min(evaluation.per_class_recall.items(), key=lambda kv: kv[1])
    assert worst < 1.0
    result = evaluate_onnx(exported.onnx_path, tables.test, Thresholds(0.0, 0.0, min_class_recall=worst + 1e-6))
    assert not result.blessed
    assert any(r.startswith(f"FAIL min_class_recall: recall of class {worst_label} ") for r in result.reasons)


def test_missing_class_is_not_blessed(exported, tables) -> None:
    without_threes = tables.test[tables.test["label"] != 3]
    result = evaluate_onnx(exported.onnx_path, without_threes, PERMISSIVE)
    assert not result.blessed
    assert "FAIL class coverage: no test images for class(es) ['3']" in result.reasons
    assert result.support["3"] == 0 and sum(map(sum, result.confusion_matrix)) == len(without_threes)


def test_thresholds_are_validated() -> None:
    assert Thresholds() == Thresholds(min_accuracy=0.95, min_macro_recall=0.95, min_class_recall=0.85)
    with pytest.raises(ValueError, match="min_accuracy"):
        Thresholds(min_accuracy=95)


def test_bad_inputs_raise_evaluation_error(exported, tables, tmp_path) -> None:
    with pytest.raises(EvaluationError, match="empty"):
        evaluate_onnx(exported.onnx_path, tables.test.head(0))
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_onnx(tmp_path / "missing.onnx", tables.test)


def test_cpu_provider_without_cuda(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert onnx_providers() == ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- richer metrics


def test_weighted_per_class_and_roc_auc_equal_sklearn(evaluation, exported, tables) -> None:
    from sklearn.metrics import roc_auc_score

    y, p = evaluation.predictions["label"], evaluation.predictions["predicted"]
    labels = list(range(10))
    precision, recall, f1, _ = precision_recall_fscore_support(y, p, labels=labels, average=None, zero_division=0)
    assert list(evaluation.per_class_precision.values()) == pytest.approx(precision.tolist())
    assert list(evaluation.per_class_f1.values()) == pytest.approx(f1.tolist())
    wp, wr, wf, _ = precision_recall_fscore_support(y, p, labels=labels, average="weighted", zero_division=0)
    assert (evaluation.precision_weighted, evaluation.recall_weighted, evaluation.f1_weighted) == pytest.approx(
        (wp, wr, wf)
    )
    pixels, _ = to_arrays(tables.test)
    session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    (probs,) = session.run(["probabilities"], {INPUT_NAME: pixels})
    probs = probs.astype(np.float64) / probs.sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert evaluation.roc_auc_ovr_macro == pytest.approx(expected)
    assert 0.5 < evaluation.roc_auc_ovr_macro <= 1.0
    metrics = evaluation.metrics()
    assert metrics["roc_auc_ovr_macro"] == evaluation.roc_auc_ovr_macro and metrics["champion"] is None


def test_roc_auc_is_none_when_a_class_is_missing(exported, tables) -> None:
    result = evaluate_onnx(exported.onnx_path, tables.test[tables.test["label"] != 3], PERMISSIVE)
    assert result.roc_auc_ovr_macro is None


# --------------------------------------------------------------------------- champion / challenger


@pytest.fixture(scope="module")
def weak_onnx(tables, tmp_path_factory):
    """A deliberately weaker model (an MLP trained for one epoch on 200 images) and its
    accuracy on the test table, to play challenger or champion against the tiny CNN."""
    from kiln.export import export_onnx
    from kiln.train import TrainConfig, train

    d = tmp_path_factory.mktemp("weak")
    config = TrainConfig(model="mlp", epochs=1, batch_size=32, device="cpu", seed=1)
    train(config, tables.train.head(200), tables.val, d / "weak.pt", log=lambda _: None)
    export_onnx(d / "weak.pt", d / "weak.onnx", tables.val, {})
    return d / "weak.onnx", evaluate_onnx(d / "weak.onnx", tables.test, PERMISSIVE).accuracy


def test_champion_check_boundaries() -> None:
    from kiln.evaluate import champion_check

    assert champion_check(0.90, 0.90, 0.0)[0]
    assert champion_check(0.895, 0.90, 0.005)[0]  # exactly at the tolerance
    ok, reason = champion_check(0.894, 0.90, 0.005)
    assert not ok and reason.startswith("FAIL champion:") and "0.8940" in reason and "0.9000" in reason


def test_challenger_worse_than_champion_is_not_blessed(evaluation, exported, weak_onnx, tables) -> None:
    weak_path, weak_acc = weak_onnx
    gap = evaluation.accuracy - weak_acc
    assert gap > 0.02  # precondition: the weak model really is weaker
    result = evaluate_onnx(weak_path, tables.test, PERMISSIVE, champion_onnx_path=exported.onnx_path, tolerance=gap / 2)
    assert not result.blessed
    failed = [r for r in result.reasons if r.startswith("FAIL")]
    assert failed == [
        f"FAIL champion: challenger accuracy {weak_acc:.4f} < champion accuracy {evaluation.accuracy:.4f} "
        f"- tolerance {gap / 2:.4f}"
    ]
    assert result.champion["accuracy"] == pytest.approx(evaluation.accuracy)
    assert result.champion["accuracy_delta"] == pytest.approx(-gap)
    # the same challenger within a wider tolerance passes
    lenient = evaluate_onnx(weak_path, tables.test, PERMISSIVE, champion_onnx_path=exported.onnx_path, tolerance=gap + 0.001)
    assert lenient.blessed and any(r.startswith("PASS champion:") for r in lenient.reasons)


def test_challenger_better_than_champion_is_blessed_and_thresholds_still_apply(evaluation, exported, weak_onnx, tables) -> None:
    weak_path, weak_acc = weak_onnx
    result = evaluate_onnx(exported.onnx_path, tables.test, PERMISSIVE, champion_onnx_path=weak_path, tolerance=0.0)
    assert result.blessed
    assert result.champion["accuracy"] == pytest.approx(weak_acc)
    assert sum(r.startswith("PASS champion:") for r in result.reasons) == 1
    assert sum("min_class_recall" in r for r in result.reasons) == 10  # threshold checks are still listed
    strict = Thresholds(min_accuracy=min(1.0, evaluation.accuracy + 0.01), min_macro_recall=0.0, min_class_recall=0.0)
    blocked = evaluate_onnx(exported.onnx_path, tables.test, strict, champion_onnx_path=weak_path, tolerance=0.0)
    assert not blocked.blessed and [r.split(":")[0] for r in blocked.reasons if r.startswith("FAIL")] == [
        "FAIL min_accuracy"
    ]


def test_tolerance_is_validated(exported, tables) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        evaluate_onnx(exported.onnx_path, tables.test, PERMISSIVE, champion_onnx_path=exported.onnx_path, tolerance=-0.1)


def test_production_onnx_path_from_the_store(exported, tmp_path) -> None:
    from kiln.evaluate import production_onnx_path
    from kiln.store import ModelStore

    assert production_onnx_path(tmp_path / "absent", "mnist") is None
    assert production_onnx_path("", "mnist") is None
    store = ModelStore(tmp_path / "store")
    version = store.add_version("mnist", exported.onnx_path, {})
    assert production_onnx_path(store.root, "mnist") is None  # stored but not promoted
    store.set_alias("mnist", version.version)
    assert production_onnx_path(store.root, "mnist") == version.onnx_path


def test_run_evaluate_against_store_champion_writes_escaped_html_report(
    exported, weak_onnx, tables, tmp_path, evaluation
) -> None:
    from kiln.evaluate import production_onnx_path, report_html, run_evaluate
    from kiln.store import ModelStore

    weak_path, weak_acc = weak_onnx
    store = ModelStore(tmp_path / "store")
    store.set_alias("mnist", store.add_version("mnist", exported.onnx_path, {}).version)
    test_path = tmp_path / "test.parquet"
    tables.test.to_parquet(test_path)
    logged: dict[str, float] = {}
    result = run_evaluate(
        weak_path, test_path, tmp_path / "pred.csv", tmp_path / "verdict.md",
        {"min_accuracy": 0.0, "min_macro_recall": 0.0, "min_class_recall": 0.0},
        log_metric=logged.__setitem__,
        champion_onnx_path=production_onnx_path(store.root, "mnist"),
        tolerance=0.005,
        report_path=tmp_path / "report" / "report.html",
    )
    assert not result.blessed
    assert logged["champion_accuracy"] == pytest.approx(evaluation.accuracy)
    assert logged["accuracy"] == pytest.approx(weak_acc)
    assert {"roc_auc_ovr_macro", "f1_weighted", "precision_weighted", "recall_weighted"} <= set(logged)
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Not blessed" in page
    assert "FAIL champion: challenger accuracy" in page and "&lt; champion accuracy" in page
    assert "< champion" not in page  # reasons are escaped
    assert "<script" not in page and "http" not in page  # self-contained
    assert page.count("class=diag") == 10
    assert "Champion accuracy" in (tmp_path / "verdict.md").read_text()
    hostile = report_html(result, title="<script>alert(1)</script>")
    assert "<script>" not in hostile and "&lt;script&gt;" in hostile
