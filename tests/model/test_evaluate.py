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
