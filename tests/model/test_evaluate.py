"""kiln.evaluate: metrics from sklearn on ONNX Runtime predictions, and the blessing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from kiln.contract import CLASS_LABELS, INPUT_NAME, LABEL_NAME
from kiln.dataset import to_arrays
from kiln.evaluate import EvaluationError, Thresholds, evaluate_onnx

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


# A tiny example scored by hand. Ten images, one per class except two 0s and no 9:
# true      0 0 1 2 3 4 5 6 7 8
# predicted 0 1 1 2 3 4 5 6 8 8
# with confidences 0.9 0.6 0.8 1.0 1.0 1.0 1.0 1.0 0.55 0.7 for the predicted class.
TINY_TRUE = np.array([0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
TINY_PRED = np.array([0, 1, 1, 2, 3, 4, 5, 6, 8, 8])
TINY_CONF = np.array([0.9, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.7])


def _tiny_probabilities() -> np.ndarray:
    """Rows with the predicted class at its confidence, the rest spread evenly."""
    p = np.repeat(((1 - TINY_CONF) / 9)[:, None], 10, axis=1)
    p[np.arange(10), TINY_PRED] = TINY_CONF
    return p.astype(np.float32)


def test_metrics_match_hand_computed_values_on_a_tiny_example() -> None:
    from kiln.evaluate import classification_metrics

    m = classification_metrics(TINY_TRUE, TINY_PRED, _tiny_probabilities())
    assert m["accuracy"] == pytest.approx(8 / 10)  # two errors: a 0 called 1, the 7 called 8
    # per class: 0 -> P 1/1, R 1/2; 1 -> P 1/2, R 1/1; 7 -> P 0, R 0; 8 -> P 1/2, R 1/1; 9 absent -> 0, 0
    precision = [1, 0.5, 1, 1, 1, 1, 1, 0, 0.5, 0]
    recall = [0.5, 1, 1, 1, 1, 1, 1, 0, 1, 0]
    f1 = [2 / 3, 2 / 3, 1, 1, 1, 1, 1, 0, 2 / 3, 0]
    assert list(m["per_class_precision"].values()) == pytest.approx(precision)
    assert list(m["per_class_recall"].values()) == pytest.approx(recall)
    assert list(m["per_class_f1"].values()) == pytest.approx(f1)
    assert m["precision_macro"] == pytest.approx(7 / 10)  # (1 + .5 + 5 + 0 + .5 + 0) / 10
    assert m["recall_macro"] == pytest.approx(7.5 / 10)
    assert m["f1_macro"] == pytest.approx((3 * 2 / 3 + 5) / 10)
    # weighted by support (2, 1, 1, 1, 1, 1, 1, 1, 1, 0)
    assert m["precision_weighted"] == pytest.approx((2 * 1 + 0.5 + 5 + 0 + 0.5) / 10)
    assert m["recall_weighted"] == pytest.approx((2 * 0.5 + 1 + 5 + 0 + 1) / 10)
    assert m["support"] == {"0": 2, **{str(c): 1 for c in range(1, 9)}, "9": 0}
    expected = np.zeros((10, 10), int)
    for t, p in [(0, 0), (0, 1), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 8), (8, 8)]:
        expected[t, p] += 1
    assert m["confusion_matrix"] == expected.tolist()
    assert m["roc_auc_ovr_macro"] is None  # class 9 has no image
    # ECE, 15 bins (k/15, (k+1)/15]: 0.55 -> bin 8, 0.6 -> 9, 0.7 -> 10, 0.8 -> 12, 0.9 -> 13,
    # the five 1.0 -> 14. |acc - conf| per bin: |0 - .55|, |0 - .6|, |1 - .7|, |1 - .8|,
    # |1 - .9|, 0; each bin holds 1 of 10 images except the last.
    assert m["expected_calibration_error"] == pytest.approx((0.55 + 0.6 + 0.3 + 0.2 + 0.1) / 10)


def test_ece_is_zero_when_confidence_is_frequency_and_large_when_overconfident() -> None:
    from kiln.evaluate import expected_calibration_error

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1])  # 7 of 8 right
    assert expected_calibration_error(y, pred, np.full(8, 7 / 8)) == pytest.approx(0.0)
    assert expected_calibration_error(y, pred, np.ones(8)) == pytest.approx(1 / 8)
    assert expected_calibration_error(y, y, np.full(8, 0.5)) == pytest.approx(0.5)  # right, but unsure


def test_evaluation_reports_and_logs_ece(evaluation, tables, exported, tmp_path) -> None:
    from kiln.evaluate import expected_calibration_error, run_evaluate

    preds = evaluation.predictions
    assert evaluation.expected_calibration_error == pytest.approx(
        expected_calibration_error(preds["label"], preds["predicted"], preds["confidence"]), abs=1e-6)
    assert 0 <= evaluation.expected_calibration_error < 0.2
    assert evaluation.metrics()["expected_calibration_error"] == evaluation.expected_calibration_error
    tables.test.to_parquet(tmp_path / "test.parquet")
    logged: dict[str, float] = {}
    run_evaluate(exported.onnx_path, tmp_path / "test.parquet", tmp_path / "p.csv", tmp_path / "v.md",
                 {"min_accuracy": 0.0, "min_macro_recall": 0.0, "min_class_recall": 0.0}, log_metric=logged.__setitem__)
    assert logged["expected_calibration_error"] == pytest.approx(evaluation.expected_calibration_error)


def test_evaluation_metrics_are_those_of_its_predictions(evaluation) -> None:
    """The metric fields are :func:`classification_metrics` of the predictions table."""
    y, p = evaluation.predictions["label"], evaluation.predictions["predicted"]
    assert evaluation.n == len(y) and evaluation.accuracy == pytest.approx(float(np.mean(y == p)))
    assert evaluation.labels == list(CLASS_LABELS) == list(evaluation.per_class_recall)
    recall = [float(np.mean(p[y == c] == c)) for c in range(10)]
    assert list(evaluation.per_class_recall.values()) == pytest.approx(recall)


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


# --------------------------------------------------------------------------- richer metrics


def test_roc_auc_is_one_for_a_perfect_ranking_and_within_bounds_here(evaluation) -> None:
    from kiln.evaluate import classification_metrics

    y = np.arange(10)
    perfect = np.full((10, 10), 0.01, np.float32)
    perfect[y, y] = 0.91
    assert classification_metrics(y, y, perfect)["roc_auc_ovr_macro"] == pytest.approx(1.0)
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
