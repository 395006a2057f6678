"""Evaluate an exported ONNX model on the test table and decide whether to bless it.

The model is run exactly as it will be served, in ONNX Runtime, on raw uint8 pixels;
metrics come from ``sklearn.metrics``. A model is *blessed* (eligible for promotion)
only if every check in :class:`Thresholds` passes and, when a production model (the
*champion*) exists, the new model (the *challenger*) is not less accurate than the
champion on the same test table by more than a tolerance. ``Evaluation.reasons``
records each check with the observed and required values, pass or fail.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from kiln.config import CHAMPION_TOLERANCE
from kiln.contract import CLASS_LABELS, NUM_CLASSES
from kiln.dataset import CLEAN_COLUMNS, read_table, to_arrays


class EvaluationError(RuntimeError):
    """The model or the test table cannot be evaluated."""


@dataclass(frozen=True)
class Thresholds:
    """Minimums a model must reach on the test table to be blessed (all inclusive)."""

    min_accuracy: float = 0.95
    """Overall accuracy (fraction of test images labelled correctly)."""

    min_macro_recall: float = 0.95
    """Recall averaged over the ten classes with equal weight, so a weak class cannot
    hide behind strong, frequent ones."""

    min_class_recall: float = 0.85
    """Recall of the worst single class: no digit may be badly served."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"Thresholds.{f.name} must be a number in [0, 1], got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class Evaluation:
    """Metrics of one model on one test table, and the blessing decision.

    ``per_class_recall``, ``support`` and the rows/columns of ``confusion_matrix``
    follow ``labels`` (``contract.CLASS_LABELS``); the confusion matrix has true classes
    as rows and predicted classes as columns. ``predictions`` has columns
    ``id``, ``label`` (true), ``predicted`` and ``confidence`` (probability of the
    predicted class), in the test table's order.
    """

    n: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    per_class_recall: dict[str, float]
    support: dict[str, int]
    confusion_matrix: list[list[int]]
    labels: list[str]
    predictions: pd.DataFrame
    blessed: bool
    reasons: list[str]
    thresholds: Thresholds
    per_class_precision: dict[str, float] = field(default_factory=dict)
    per_class_f1: dict[str, float] = field(default_factory=dict)
    precision_weighted: float = math.nan
    recall_weighted: float = math.nan
    f1_weighted: float = math.nan
    roc_auc_ovr_macro: float | None = None
    """One-vs-rest ROC AUC averaged over classes with equal weight; None when it is
    undefined (some class has no test image)."""
    expected_calibration_error: float = math.nan
    """How far the confidence of the predicted class is from its accuracy, see
    :func:`expected_calibration_error` (0: confidences are frequencies)."""
    champion: dict[str, Any] | None = None
    """When a production model was compared: its ``accuracy``, ``n``, the ``tolerance``
    and ``accuracy_delta`` (challenger - champion); None when there was no champion."""

    def metrics(self) -> dict[str, Any]:
        """Everything except the predictions, JSON-safe (for metrics files and lineage)."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "precision_macro": self.precision_macro,
            "recall_macro": self.recall_macro,
            "f1_macro": self.f1_macro,
            "precision_weighted": self.precision_weighted,
            "recall_weighted": self.recall_weighted,
            "f1_weighted": self.f1_weighted,
            "roc_auc_ovr_macro": self.roc_auc_ovr_macro,
            "expected_calibration_error": self.expected_calibration_error,
            "per_class_precision": dict(self.per_class_precision),
            "per_class_recall": dict(self.per_class_recall),
            "per_class_f1": dict(self.per_class_f1),
            "support": dict(self.support),
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
            "labels": list(self.labels),
            "blessed": self.blessed,
            "reasons": list(self.reasons),
            "thresholds": self.thresholds.to_dict(),
            "champion": None if self.champion is None else dict(self.champion),
        }


def predict_onnx(onnx_path: str | Path, pixels: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Run the ONNX model on uint8 pixels [N, 28, 28] in batches, in a session built
    exactly as the server builds it (:func:`kiln.runtime.predict`).

    Returns (probabilities float32 [N, 10], label int64 [N]). Raises
    :class:`EvaluationError` if the file is missing or its interface is not the
    contract's.
    """
    from kiln.runtime import ContractError, SessionError, predict

    try:
        return predict(onnx_path, pixels, batch_size=batch_size)
    except (SessionError, ContractError) as e:
        raise EvaluationError(str(e)) from e


def _check(name: str, what: str, observed: float, required: float) -> tuple[bool, str]:
    ok = observed >= required
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: {what} {observed:.4f} {'>=' if ok else '<'} {required:.4f}"


DEFAULT_CHAMPION_TOLERANCE = CHAMPION_TOLERANCE
"""How much accuracy (a fraction: 0.005 = half a point) a challenger may lose against
the production model and still be blessed (defined in ``kiln.config``, with the other
run parameters that are no field of a stage config)."""


def _roc_auc(y_true: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC AUC over the ten classes, or None if a class is absent."""
    if len(np.unique(y_true)) < NUM_CLASSES:
        return None
    p = probabilities.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)  # float32 softmax rows may miss 1 by more than sklearn allows
    return float(roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=list(range(NUM_CLASSES))))


def champion_check(challenger_accuracy: float, champion_accuracy: float, tolerance: float) -> tuple[bool, str]:
    """The challenger passes if its accuracy >= champion's - ``tolerance`` (inclusive)."""
    required = champion_accuracy - tolerance
    ok = challenger_accuracy >= required - 1e-12  # float noise must not flip an exact tie
    return ok, (
        f"{'PASS' if ok else 'FAIL'} champion: challenger accuracy {challenger_accuracy:.4f} "
        f"{'>=' if ok else '<'} champion accuracy {champion_accuracy:.4f} - tolerance {tolerance:.4f}"
    )


def evaluate_onnx(
    onnx_path: str | Path,
    test_df: pd.DataFrame,
    thresholds: Thresholds = Thresholds(),
    champion_onnx_path: str | Path | None = None,
    tolerance: float = DEFAULT_CHAMPION_TOLERANCE,
) -> Evaluation:
    """Run the ONNX model over the clean table ``test_df`` and score it.

    Metrics come from :func:`classification_metrics`. ``blessed`` is True only
    if every class has at least one test image (otherwise its recall means nothing)
    and accuracy, macro recall and every per-class recall reach ``thresholds``, and,
    when ``champion_onnx_path`` (the production model) is given, the challenger's
    accuracy on the same table is at least the champion's minus ``tolerance``.
    Raises :class:`EvaluationError` for an empty table or an unusable model
    (champion included: a production model that cannot be scored is not ignored).
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance must be a number in [0, 1], got {tolerance!r}")
    if len(test_df) == 0:
        raise EvaluationError("test table is empty")
    pixels, y_true = to_arrays(test_df)
    if y_true.min() < 0 or y_true.max() >= NUM_CLASSES:
        raise EvaluationError(f"test labels outside [0, {NUM_CLASSES}): {sorted(set(y_true.tolist()))}")
    probabilities, y_pred = predict_onnx(onnx_path, pixels)

    metrics = classification_metrics(y_true, y_pred, probabilities)
    results = _threshold_checks(metrics, thresholds)
    champion = None
    if champion_onnx_path is not None:
        _, champion_pred = predict_onnx(champion_onnx_path, pixels)
        champion_accuracy = float(accuracy_score(y_true, champion_pred))
        results.append(champion_check(metrics["accuracy"], champion_accuracy, float(tolerance)))
        champion = {
            "onnx_path": str(champion_onnx_path),
            "accuracy": champion_accuracy,
            "n": len(y_true),
            "tolerance": float(tolerance),
            "accuracy_delta": metrics["accuracy"] - champion_accuracy,
        }

    predictions = pd.DataFrame(
        {
            "id": test_df["id"].to_numpy(),
            "label": y_true,
            "predicted": y_pred.astype(np.int64),
            "confidence": probabilities[np.arange(len(y_pred)), y_pred].astype(np.float32),
        }
    )
    return Evaluation(
        n=len(y_true),
        labels=list(CLASS_LABELS),
        predictions=predictions,
        blessed=all(ok for ok, _ in results),
        reasons=[reason for _, reason in results],
        thresholds=thresholds,
        champion=champion,
        **metrics,
    )


ECE_BINS = 15
"""Equal-width confidence bins of :func:`expected_calibration_error` (the usual 15)."""


def expected_calibration_error(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al., 2017): images are put in ``bins``
    equal-width bins (lo, hi] by the confidence of their predicted class, and
    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|``. 0 when every
    confidence is the frequency with which such predictions are right. scikit-learn
    has no multi-class ECE (``calibration_curve`` is binary), hence these few lines."""
    if len(y_true) == 0:
        return math.nan
    confidence = np.asarray(confidence, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)  # (lo, hi]; 0 goes to bin 0
    correct = (np.asarray(y_pred) == np.asarray(y_true)).astype(np.float64)
    gap = np.bincount(which, weights=correct, minlength=bins) - np.bincount(which, weights=confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(y_true))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Every metric field of :class:`Evaluation`, computed over all ten classes (absent
    ones included, scoring 0 where undefined) by scikit-learn, plus ECE. ``labels``
    of the per-class dicts are ``contract.CLASS_LABELS``."""
    class_ids, labels = list(range(NUM_CLASSES)), list(CLASS_LABELS)

    def prf(average: str | None) -> tuple:
        return precision_recall_fscore_support(y_true, y_pred, labels=class_ids, average=average, zero_division=0)

    (precision, recall, f1, _), (c_precision, c_recall, c_f1, support) = prf("macro"), prf(None)
    w_precision, w_recall, w_f1, _ = prf("weighted")
    confidence = probabilities[np.arange(len(y_pred)), y_pred]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "per_class_recall": {labels[i]: float(c_recall[i]) for i in class_ids},
        "support": {labels[i]: int(support[i]) for i in class_ids},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=class_ids).astype(int).tolist(),
        "per_class_precision": {labels[i]: float(c_precision[i]) for i in class_ids},
        "per_class_f1": {labels[i]: float(c_f1[i]) for i in class_ids},
        "precision_weighted": float(w_precision),
        "recall_weighted": float(w_recall),
        "f1_weighted": float(w_f1),
        "roc_auc_ovr_macro": _roc_auc(y_true, probabilities),
        "expected_calibration_error": expected_calibration_error(y_true, y_pred, confidence),
    }


def _threshold_checks(metrics: Mapping[str, Any], thresholds: Thresholds) -> list[tuple[bool, str]]:
    """Every threshold check, passing or not: accuracy, macro recall, class coverage and
    the recall of each class that has test images."""
    results = [
        _check("min_accuracy", "accuracy", metrics["accuracy"], thresholds.min_accuracy),
        _check("min_macro_recall", "macro recall", metrics["recall_macro"], thresholds.min_macro_recall),
    ]
    missing = [label for label, n in metrics["support"].items() if n == 0]
    results.append(
        (False, f"FAIL class coverage: no test images for class(es) {missing}")
        if missing
        else (True, f"PASS class coverage: all {NUM_CLASSES} classes have test images")
    )
    for label, recall in metrics["per_class_recall"].items():
        if metrics["support"][label]:
            results.append(_check("min_class_recall", f"recall of class {label}", recall, thresholds.min_class_recall))
    return results


__all__ = [
    "DEFAULT_CHAMPION_TOLERANCE",
    "ECE_BINS",
    "Evaluation",
    "EvaluationError",
    "Thresholds",
    "champion_check",
    "classification_metrics",
    "evaluate_onnx",
    "expected_calibration_error",
    "predict_onnx",
    "production_onnx_path",
    "report_html",
    "run_evaluate",
    "verdict_markdown",
]


SCALAR_METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "expected_calibration_error",
)


def production_onnx_path(store_root: str | Path | None, model_name: str) -> Path | None:
    """The ONNX file of ``model_name``'s production version in the model store at
    ``store_root``, or None when there is no store, no such model or no production alias."""
    from kiln.store import ModelStore

    if not store_root or not model_name:
        return None
    version = ModelStore(store_root).production(model_name)
    return None if version is None else version.onnx_path


def verdict_markdown(evaluation: Evaluation) -> str:
    """The blessing decision and each check behind it, as Markdown."""
    head = "Blessed: deploy" if evaluation.blessed else "Not blessed: not deployed"
    lines = [f"# {head}", "", f"Test images: {evaluation.n}", ""]
    if evaluation.champion is None:
        lines += ["Champion: none (no production model to compare with)", ""]
    else:
        c = evaluation.champion
        lines += [f"Champion accuracy: {c['accuracy']:.4f} (challenger {evaluation.accuracy:.4f}, "
                  f"tolerance {c['tolerance']:.4f})", ""]
    lines += [f"- {reason}" for reason in evaluation.reasons]
    return "\n".join(lines) + "\n"


def report_html(evaluation: Evaluation, title: str = "kiln evaluation") -> str:
    """A self-contained HTML page (no scripts, no external resources; every value
    escaped): verdict, reasons, scalar metrics, per-class table and confusion matrix."""
    from kiln.html import render

    return render("evaluation.html", e=evaluation, title=title)


def run_evaluate(
    onnx_path: str | Path,
    test_path: str | Path,
    predictions_path: str | Path,
    verdict_path: str | Path,
    thresholds: Mapping[str, float] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    champion_onnx_path: str | Path | None = None,
    tolerance: float = DEFAULT_CHAMPION_TOLERANCE,
    report_path: str | Path | None = None,
) -> Evaluation:
    """File-level entry point of the evaluate step.

    Writes the per-image predictions (CSV: id, label, predicted, confidence), the
    verdict (Markdown) and, given ``report_path``, the HTML report; ``log_metric``
    receives the scalar test metrics. ``champion_onnx_path`` is the production model
    to beat (None: thresholds alone decide), see :func:`evaluate_onnx`.
    """
    evaluation = evaluate_onnx(
        onnx_path,
        read_table(test_path, CLEAN_COLUMNS),
        Thresholds(**(thresholds or {})),
        champion_onnx_path=champion_onnx_path,
        tolerance=tolerance,
    )
    Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
    evaluation.predictions.to_csv(predictions_path, index=False)
    Path(verdict_path).parent.mkdir(parents=True, exist_ok=True)
    Path(verdict_path).write_text(verdict_markdown(evaluation))
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(report_html(evaluation), encoding="utf-8")
    if log_metric is not None:
        for name in SCALAR_METRICS:
            log_metric(name, float(getattr(evaluation, name)))
        if evaluation.roc_auc_ovr_macro is not None:
            log_metric("roc_auc_ovr_macro", evaluation.roc_auc_ovr_macro)
        if evaluation.champion is not None:
            log_metric("champion_accuracy", evaluation.champion["accuracy"])
            log_metric("champion_accuracy_delta", evaluation.champion["accuracy_delta"])
        log_metric("test_images", evaluation.n)
    return evaluation
