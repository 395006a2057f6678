"""The run report: one self-contained HTML page that shows a whole pipeline run.

A :class:`RunReport` holds one run's facts, each part optional (a run without a
production model has no drift check and no champion; an unblessed model is not
deployed). Every part is built either from the objects a step returns (``from_report``,
``from_evaluation``...) or from the files and artifact metadata the steps leave behind
(``from_files``, ``from_metrics``), which is what the pipeline's report step has;
:func:`collect_run` does the latter for a whole run. :func:`render_report` turns it into
one HTML file: plots are PNGs drawn by matplotlib (Agg) and quarantined images are
thumbnails, all inline as ``data:`` URIs, so the page loads nothing from anywhere.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import plots
from kiln.contract import CLASS_LABELS
from kiln.html import render

SECTIONS = ("lineage", "cleaning", "validation", "drift", "training", "evaluation", "export", "champion", "verdict")
"""The page's sections, in order; each is an element with id ``section-<name>``, present
even when the run has nothing to show there (it then says why)."""

THUMBNAILS_PER_REASON = 3
THUMBNAIL_PX = 56


@dataclass(frozen=True)
class Lineage:
    """Where the run came from: code version, data version, the parameters it ran with."""

    git_commit: str
    data_version: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    data_repo: str = ""
    data_rev: str = ""
    run: str = ""


@dataclass(frozen=True)
class QuarantinedImage:
    """One quarantined row; ``thumbnail`` is PNG bytes, None when it holds no decodable image."""

    id: str
    path: str
    reason: str
    detail: str
    thumbnail: bytes | None = None


def thumbnail(data: bytes | None, px: int = THUMBNAIL_PX) -> bytes | None:
    """A grayscale PNG of the image in ``data`` fitted into ``px`` x ``px`` (small digits
    enlarged with nearest-neighbour so their pixels stay visible); None if it does not decode."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("L", (px, px))  # lets a huge JPEG decode small
            gray = image.convert("L")
    except Exception:  # noqa: BLE001 - quarantined files are broken in every way Pillow knows
        return None
    scale = px / max(gray.size)
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    gray = gray.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)
    out = io.BytesIO()
    gray.save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Cleaning:
    """What cleaning kept and dropped, with a few quarantined images per reason."""

    n_input: int
    n_clean: int
    n_quarantined: int
    by_reason: Mapping[str, int]
    converted: int = 0
    resized: int = 0
    examples: tuple[QuarantinedImage, ...] = ()

    @classmethod
    def from_files(cls, quarantine_csv: str | Path, cleaned: str | Path | None = None, raw: str | Path | None = None,
                   repairs_csv: str | Path | None = None, n_clean: int | None = None,
                   per_reason: int = THUMBNAILS_PER_REASON) -> Cleaning:
        """From the clean step's quarantine CSV (id, path, reason, detail), its clean table
        (or ``n_clean``) and repairs CSV; thumbnails come from the ingested ``raw`` table."""
        import pandas as pd

        quarantine = pd.read_csv(quarantine_csv, dtype=str, keep_default_na=False)
        if n_clean is None:
            n_clean = _parquet_rows(cleaned) if cleaned is not None else 0
        fixes = Counter()
        if repairs_csv is not None and Path(repairs_csv).is_file():
            fixes = Counter(pd.read_csv(repairs_csv, dtype=str, keep_default_na=False)["fix"])
        picked = quarantine.groupby("reason", sort=True).head(per_reason)
        images = _raw_images(raw, set(picked["path"])) if raw is not None else {}
        examples = tuple(
            QuarantinedImage(row.id, row.path, row.reason, row.detail, thumbnail(images.get(row.path)))
            for row in picked.itertuples(index=False)
        )
        return cls(
            n_input=n_clean + len(quarantine),
            n_clean=n_clean,
            n_quarantined=len(quarantine),
            by_reason=dict(sorted(Counter(quarantine["reason"]).items())),
            converted=fixes.get("grayscale", 0),
            resized=fixes.get("resized", 0),
            examples=examples,
        )


def _parquet_rows(path: str | Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _raw_images(raw: str | Path, paths: set[str]) -> dict[str, bytes | None]:
    """PNG bytes by path for ``paths`` in the ingested table (only those rows are read)."""
    import pyarrow.parquet as pq

    if not paths:
        return {}
    table = pq.read_table(raw, columns=["path", "png"], filters=[("path", "in", sorted(paths))])
    return dict(zip(table.column("path").to_pylist(), table.column("png").to_pylist()))


@dataclass(frozen=True)
class Validation:
    """The data validation outcome (the run stops when it fails, so a report usually shows a pass)."""

    rows: int
    evaluated: int
    passed: int
    failed: int
    failed_names: tuple[str, ...] = ()

    @classmethod
    def from_report(cls, report: Any) -> Validation:
        """From a ``kiln.validate.ValidationReport``."""
        return cls(report.n_rows, report.evaluated, report.successful, report.failed, tuple(report.failed_names()))

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Validation:
        """From the validate step's metrics (rows, expectations, expectations_passed/_failed)."""
        return cls(int(metrics["rows"]), int(metrics["expectations"]), int(metrics["expectations_passed"]),
                   int(metrics["expectations_failed"]))


@dataclass(frozen=True)
class Drift:
    """The drift check: PSI per statistic and the label test, or why there was none."""

    checked: bool
    reason: str = ""
    psi: Mapping[str, float] = field(default_factory=dict)
    chi2_p_value: float | None = None
    drifted: bool = False
    reference_version: str = ""
    psi_warn: float = 0.1
    psi_fail: float = 0.25
    chi2_threshold: float = 0.01

    def status(self, value: float) -> str:
        return "drift" if value >= self.psi_fail else "warn" if value >= self.psi_warn else "ok"

    @classmethod
    def from_report(cls, report: Any | None, reason: str = "no production model to compare with",
                    reference_version: str = "") -> Drift:
        """From a ``kiln.drift.DriftReport``, or None (then ``reason`` says why)."""
        if report is None:
            return cls(checked=False, reason=reason)
        c = report.config
        return cls(True, psi=dict(report.psi), chi2_p_value=report.chi2_p_value, drifted=report.drifted,
                   reference_version=reference_version, psi_warn=c.psi_warn, psi_fail=c.psi_fail,
                   chi2_threshold=c.chi2_p_value)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Drift:
        """From the drift step's metrics (drift_checked, psi_<statistic>, label_chi2_p_value...)."""
        if not metrics.get("drift_checked"):
            return cls(checked=False, reason="no production model with reference statistics to compare with")
        psi = {k.removeprefix("psi_"): float(v) for k, v in metrics.items() if k.startswith("psi_")}
        return cls(True, psi=psi, chi2_p_value=float(metrics.get("label_chi2_p_value", "nan")),
                   drifted=bool(metrics.get("drifted")), reference_version=str(metrics.get("reference_version", "")))


@dataclass(frozen=True)
class Training:
    """Per-epoch curves (epoch, train_loss, val_loss, val_accuracy) and the best epoch."""

    history: tuple[Mapping[str, float], ...]
    best_epoch: int | None = None

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Training:
        """From the train step's metrics: ``epochNN_<key>`` per epoch and ``best_epoch``."""
        rows: dict[int, dict[str, float]] = {}
        for key, value in metrics.items():
            match = re.fullmatch(r"epoch(\d+)_(\w+)", key)
            if match:
                epoch = int(match.group(1))
                rows.setdefault(epoch, {"epoch": epoch})[match.group(2)] = float(value)
        best = metrics.get("best_epoch")
        return cls(tuple(rows[e] for e in sorted(rows)), int(best) if best is not None else None)


@dataclass(frozen=True)
class ExportSummary:
    """ONNX parity with PyTorch, and the reduced-precision variants (``variants.json``)."""

    parity_max_abs_diff: float | None
    opset: int | None = None
    variants: Mapping[str, Any] | None = None

    @classmethod
    def from_files(cls, onnx_metadata: Mapping[str, Any], variants_dir: str | Path | None = None) -> ExportSummary:
        """From the export step's ONNX artifact metadata and its variants folder."""
        variants = None
        if variants_dir is not None and (Path(variants_dir) / "variants.json").is_file():
            variants = json.loads((Path(variants_dir) / "variants.json").read_text())
        diff, opset = onnx_metadata.get("parity_max_abs_diff"), onnx_metadata.get("opset")
        return cls(None if diff is None else float(diff), None if opset is None else int(opset), variants)


@dataclass(frozen=True)
class EvaluationSummary:
    """Test metrics, confusion matrix, per-class recall, champion comparison and the checks."""

    metrics: Mapping[str, float]
    labels: tuple[str, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]
    per_class_recall: Mapping[str, float]
    support: Mapping[str, int]
    reasons: tuple[str, ...]
    blessed: bool
    champion: Mapping[str, Any] | None = None
    min_class_recall: float | None = None

    @property
    def n(self) -> int:
        return sum(self.support.values())

    @classmethod
    def from_evaluation(cls, evaluation: Any) -> EvaluationSummary:
        """From a ``kiln.evaluate.Evaluation``."""
        names = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "roc_auc_ovr_macro")
        return cls({k: getattr(evaluation, k) for k in names}, tuple(evaluation.labels),
                   tuple(tuple(int(v) for v in row) for row in evaluation.confusion_matrix),
                   dict(evaluation.per_class_recall), dict(evaluation.support), tuple(evaluation.reasons),
                   bool(evaluation.blessed), evaluation.champion, evaluation.thresholds.min_class_recall)

    @classmethod
    def from_files(cls, metrics: Mapping[str, Any], predictions_csv: str | Path, verdict_md: str | Path,
                   blessed: bool, min_class_recall: float | None = None) -> EvaluationSummary:
        """From the evaluate step's metrics, per-image predictions CSV and verdict Markdown
        (whose ``- PASS``/``- FAIL`` lines are the checks)."""
        import pandas as pd
        from sklearn.metrics import confusion_matrix, recall_score

        predictions = pd.read_csv(predictions_csv)
        ids = list(range(len(CLASS_LABELS)))
        y_true, y_pred = predictions["label"].to_numpy(), predictions["predicted"].to_numpy()
        matrix = confusion_matrix(y_true, y_pred, labels=ids)
        recall = recall_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
        reasons = tuple(line[2:] for line in Path(verdict_md).read_text().splitlines()
                        if line.startswith(("- PASS ", "- FAIL ")))
        champion = None
        if "champion_accuracy" in metrics:
            champion = {"accuracy": float(metrics["champion_accuracy"]),
                        "accuracy_delta": float(metrics.get("champion_accuracy_delta", "nan"))}
        scores = {k: float(v) for k, v in metrics.items() if not k.startswith("champion") and k != "test_images"}
        return cls(scores, CLASS_LABELS,
                   tuple(tuple(int(v) for v in row) for row in matrix),
                   {CLASS_LABELS[i]: float(recall[i]) for i in ids},
                   {CLASS_LABELS[i]: int(matrix[i].sum()) for i in ids}, reasons, bool(blessed), champion,
                   min_class_recall)


@dataclass(frozen=True)
class Deployment:
    """Where the blessed model went (``version`` in the store at ``location``), or why nothing moved."""

    version: str | None
    location: str = ""
    reason: str = ""


@dataclass(frozen=True)
class RunReport:
    """Everything the report shows; any part may be None (the page says it is absent)."""

    lineage: Lineage
    cleaning: Cleaning | None = None
    validation: Validation | None = None
    drift: Drift | None = None
    training: Training | None = None
    export: ExportSummary | None = None
    evaluation: EvaluationSummary | None = None
    deployment: Deployment | None = None


def deployment_of(evaluation: EvaluationSummary | None, version: str | None, store: str | Path | None = None,
                  model_name: str = "") -> Deployment:
    """The deploy outcome: ``version`` is what deploy returned ("" or None: it did not run)."""
    if version:
        location = str(Path(store) / model_name / version) if store else ""
        return Deployment(str(version), location)
    if evaluation is None:
        return Deployment(None, reason="the model was not evaluated")
    if not evaluation.blessed:
        failed = [r for r in evaluation.reasons if r.startswith("FAIL")]
        return Deployment(None, reason="not blessed: " + ("; ".join(failed) or "a check failed"))
    return Deployment(None, reason="blessed, but no deployed version was reported")


def _figures(report: RunReport) -> dict[str, bytes]:
    """The run's plots as PNG bytes, by name; a plot without data is left out."""
    figures: dict[str, bytes] = {}
    if report.training is not None and report.training.history:
        figures["curves"] = plots.training_curves(report.training.history, report.training.best_epoch)
    ev = report.evaluation
    if ev is not None:
        figures["confusion"] = plots.confusion_heatmap(ev.confusion_matrix, ev.labels)
        figures["recall"] = plots.recall_bars(ev.per_class_recall, ev.min_class_recall)
        if ev.champion is not None:
            figures["champion"] = plots.accuracy_bars(
                {"challenger (this run)": ev.metrics["accuracy"], "champion (production)": ev.champion["accuracy"]},
                "challenger vs champion")
    variants = (report.export.variants or {}) if report.export is not None else {}
    scored = {name: v["accuracy"] for name, v in variants.get("variants", {}).items() if v.get("accuracy") is not None}
    if scored and "baseline" in variants:
        figures["variants"] = plots.accuracy_bars({"fp32": variants["baseline"]["accuracy"], **scored},
                                                  "ONNX variants")
    return figures


def render_report(report: RunReport, generated: dt.datetime | None = None) -> str:
    """The report as one self-contained HTML page (see the module docstring)."""
    generated = generated or dt.datetime.now(dt.timezone.utc)
    return render("report.html", r=report, figures=_figures(report), sections=SECTIONS,
                  generated=generated.strftime("%Y-%m-%d %H:%M:%S %Z").strip())


def write_report(report: RunReport, path: str | Path) -> Path:
    """Render ``report`` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(report), encoding="utf-8")
    return path


def _present(path: str | Path | None) -> Path | None:
    return Path(path) if path is not None and Path(path).exists() else None


def collect_run(
    lineage: Lineage,
    *,
    raw: str | Path | None = None,
    cleaned: str | Path | None = None,
    quarantine: str | Path | None = None,
    repairs: str | Path | None = None,
    validation_metrics: Mapping[str, Any] | None = None,
    drift_metrics: Mapping[str, Any] | None = None,
    curves_metrics: Mapping[str, Any] | None = None,
    onnx_metadata: Mapping[str, Any] | None = None,
    variants_dir: str | Path | None = None,
    eval_metrics: Mapping[str, Any] | None = None,
    predictions: str | Path | None = None,
    verdict: str | Path | None = None,
    blessed: bool | None = None,
    deployed_version: str | None = None,
    model_store: str | Path | None = None,
    model_name: str = "",
) -> RunReport:
    """A RunReport from what the steps wrote: artifact files (paths) and artifact metadata
    (the dicts KFP keeps per artifact). Anything absent or None leaves its part out."""
    cleaning = None
    if _present(quarantine):
        cleaning = Cleaning.from_files(quarantine, cleaned=_present(cleaned), raw=_present(raw),
                                       repairs_csv=_present(repairs))
    evaluation = None
    if eval_metrics and _present(predictions) and _present(verdict):
        threshold = lineage.parameters.get("min_class_recall")
        evaluation = EvaluationSummary.from_files(eval_metrics, predictions, verdict, bool(blessed),
                                                  None if threshold is None else float(threshold))
    return RunReport(
        lineage=lineage,
        cleaning=cleaning,
        validation=Validation.from_metrics(validation_metrics) if validation_metrics else None,
        drift=Drift.from_metrics(drift_metrics) if drift_metrics is not None else None,
        training=Training.from_metrics(curves_metrics) if curves_metrics else None,
        export=ExportSummary.from_files(onnx_metadata, _present(variants_dir)) if onnx_metadata is not None else None,
        evaluation=evaluation,
        deployment=deployment_of(evaluation, deployed_version, model_store, model_name),
    )


__all__ = [
    "SECTIONS",
    "Cleaning",
    "Deployment",
    "Drift",
    "EvaluationSummary",
    "ExportSummary",
    "Lineage",
    "QuarantinedImage",
    "RunReport",
    "Training",
    "Validation",
    "collect_run",
    "deployment_of",
    "render_report",
    "thumbnail",
    "write_report",
]
