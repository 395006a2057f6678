"""Data drift: compare a new clean table with the data the production model was trained on.

The reference is compact: the per-image statistics of ``kiln.stats.image_statistics``
without the id and hash columns (``label``, ``width``, ``height``, ``mean``, ``std``,
``min``, ``max``, ``ink_fraction``: one narrow row per image), stored with each model as
``stats.parquet`` in its model-store version directory (``save_reference_statistics``).

Two tests, thresholds in ``DriftConfig``:

* **PSI** (population stability index) per numeric statistic. Bins come from the
  reference: the unique quantiles ``q_0 = min, q_1, ..., q_B = max`` at ``k / B``
  (``B = config.psi_bins``); the bins are ``x < min``, ``[min, q_1]``, ``(q_1, q_2]``, ...,
  ``(q_{B-1}, max]`` and ``x > max``. Ties collapse equal quantiles, so a constant
  statistic (``width`` = 28) gets exactly three bins: below, equal, above. The two outer
  bins are empty in the reference by construction, so a shift past the reference range
  shows up as mass in a bin the reference never used.
  ``PSI = sum_i (c_i - r_i) * ln(c_i / r_i)`` over the bin shares ``r`` (reference) and
  ``c`` (current). **Epsilon**: every share is floored at ``config.psi_epsilon`` (1e-4)
  before the sum, without renormalising, so an empty bin never divides by zero or takes
  the log of zero: a bin empty on both sides contributes exactly 0, and a bin empty on
  one side only contributes ``(p - eps) * ln(p / eps)``, large (0.83 for p = 0.1) but
  finite. Nulls are dropped first; a statistic with no values on either side is skipped.
* **chi-square** test of homogeneity on the label counts (reference vs current, a
  2 x K contingency table over the union of labels, ``scipy.stats.chi2_contingency``).
  A class missing from the current data (or new in it) gives a zero cell and a tiny
  p-value.

A statistic *drifts* when its PSI >= ``psi_fail``; ``psi_warn <= PSI < psi_fail`` is
reported as a warning only. The labels drift when the p-value < ``chi2_p_value``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kiln.dataset import CLEAN_COLUMNS, read_table
from kiln.html import render, trusted
from kiln.stats import (  # noqa: F401 (the reference statistics are part of drift's API too)
    REFERENCE_COLUMNS, STATS_FILE, image_statistics, reference_statistics, save_reference_statistics,
)
from kiln.store import ModelStore

LABEL_STATISTIC = "label"
"""Name under which a label-distribution drift is reported among the drifted statistics."""

ACTIONS = ("warn", "fail")


class DataDriftError(RuntimeError):
    """Drift was found and the action is ``fail``; the report and HTML path are attached."""

    def __init__(self, report: DriftReport, html_path: str | Path) -> None:
        self.report = report
        self.html_path = Path(html_path)
        super().__init__(
            f"data drift in {', '.join(report.drifted_statistics)} "
            f"(PSI fail threshold {report.config.psi_fail}, chi-square p < {report.config.chi2_p_value}); "
            f"see {self.html_path}"
        )


@dataclass(frozen=True)
class DriftConfig:
    """Drift thresholds.

    psi_warn: PSI at or above this is reported as a warning (0.1, the usual "moderate shift").
    psi_fail: PSI at or above this is drift (0.25, the usual "significant shift").
    chi2_p_value: label distributions differ when the chi-square p-value is below this.
    psi_bins: quantile bins taken from the reference (fewer when quantiles tie).
    psi_epsilon: floor on every bin share, see the module docstring.
    statistics: the numeric statistics compared by PSI.
    """

    psi_warn: float = 0.1
    psi_fail: float = 0.25
    chi2_p_value: float = 0.01
    psi_bins: int = 10
    psi_epsilon: float = 1e-4
    statistics: tuple[str, ...] = ("mean", "std", "min", "max", "ink_fraction", "width", "height")

    def __post_init__(self) -> None:
        if not 0 < self.psi_warn <= self.psi_fail:
            raise ValueError(f"need 0 < psi_warn <= psi_fail, got {self.psi_warn}, {self.psi_fail}")
        if not 0 < self.chi2_p_value < 1:
            raise ValueError(f"chi2_p_value must be in (0, 1), got {self.chi2_p_value}")
        if self.psi_bins < 1 or not 0 < self.psi_epsilon < 1:
            raise ValueError(f"bad psi_bins/psi_epsilon: {self.psi_bins}, {self.psi_epsilon}")


@dataclass(frozen=True)
class StatisticDrift:
    """PSI of one statistic; ``status`` is ``ok``, ``warn`` or ``drift``."""

    name: str
    psi: float
    status: str
    reference_mean: float
    current_mean: float
    bins: int


@dataclass(frozen=True)
class DriftReport:
    """Result of ``compare``."""

    statistics: tuple[StatisticDrift, ...]
    chi2_statistic: float
    chi2_p_value: float
    label_counts_reference: dict[int, int]
    label_counts_current: dict[int, int]
    n_reference: int
    n_current: int
    config: DriftConfig = field(default_factory=DriftConfig)
    skipped: tuple[str, ...] = ()

    @property
    def psi(self) -> dict[str, float]:
        """PSI per statistic."""
        return {s.name: s.psi for s in self.statistics}

    @property
    def labels_drifted(self) -> bool:
        return self.chi2_p_value < self.config.chi2_p_value

    @property
    def drifted_statistics(self) -> list[str]:
        """Statistics with PSI >= psi_fail, then ``label`` if the chi-square test failed."""
        names = [s.name for s in self.statistics if s.status == "drift"]
        return names + ([LABEL_STATISTIC] if self.labels_drifted else [])

    @property
    def warned_statistics(self) -> list[str]:
        return [s.name for s in self.statistics if s.status == "warn"]

    @property
    def drifted(self) -> bool:
        return bool(self.drifted_statistics)

    def render_html(self) -> str:
        """A self-contained HTML page (inline CSS, no scripts); all text escaped."""
        return _page(_report_body(self), "DRIFT" if self.drifted else "no drift")


def _numeric(series: pd.Series) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    return values[~np.isnan(values)]


def psi_bin_cuts(reference: np.ndarray, bins: int) -> np.ndarray:
    """Right-closed cut points for ``np.searchsorted(cuts, x, side="left")`` giving the
    bins of the module docstring: ``x < min`` is bin 0, ``x > max`` the last bin."""
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)))
    below_min = np.nextafter(edges[0], -np.inf)
    return np.concatenate([[below_min], edges[1:] if len(edges) > 1 else edges])


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10, epsilon: float = 1e-4) -> tuple[float, int]:
    """(PSI of ``current`` against ``reference``, number of bins); both non-empty, no NaN."""
    cuts = psi_bin_cuts(reference, bins)
    n_bins = len(cuts) + 1
    ref_share = np.bincount(np.searchsorted(cuts, reference, side="left"), minlength=n_bins) / len(reference)
    cur_share = np.bincount(np.searchsorted(cuts, current, side="left"), minlength=n_bins) / len(current)
    r = np.maximum(ref_share, epsilon)
    c = np.maximum(cur_share, epsilon)
    return float(np.sum((c - r) * np.log(c / r))), n_bins


def _label_counts(series: pd.Series) -> dict[int, int]:
    counts = series.dropna().astype("int64").value_counts()
    return {int(k): int(v) for k, v in sorted(counts.items())}


def compare(current_stats: pd.DataFrame, reference_stats: pd.DataFrame, config: DriftConfig | None = None) -> DriftReport:
    """PSI per statistic and a chi-square test on labels (see module docstring).

    Both frames need ``label`` and the configured statistics columns (as produced by
    ``reference_statistics``; extra columns are ignored). Raises ValueError if either is
    empty or lacks a column.
    """
    config = config or DriftConfig()
    for name, frame in (("current", current_stats), ("reference", reference_stats)):
        missing = [c for c in (LABEL_STATISTIC, *config.statistics) if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} statistics lack columns {missing}")
        if len(frame) == 0:
            raise ValueError(f"{name} statistics are empty")

    results, skipped = [], []
    for name in config.statistics:
        ref, cur = _numeric(reference_stats[name]), _numeric(current_stats[name])
        if len(ref) == 0 or len(cur) == 0:
            skipped.append(name)
            continue
        value, n_bins = psi(ref, cur, config.psi_bins, config.psi_epsilon)
        status = "drift" if value >= config.psi_fail else "warn" if value >= config.psi_warn else "ok"
        results.append(StatisticDrift(name, value, status, float(ref.mean()), float(cur.mean()), n_bins))

    ref_counts, cur_counts = _label_counts(reference_stats[LABEL_STATISTIC]), _label_counts(current_stats[LABEL_STATISTIC])
    labels = sorted(set(ref_counts) | set(cur_counts))
    if len(labels) < 2 or not ref_counts or not cur_counts:
        chi2, p_value = 0.0, 1.0  # nothing to compare a distribution over
    else:
        from scipy.stats import chi2_contingency

        table = np.array([[ref_counts.get(k, 0) for k in labels], [cur_counts.get(k, 0) for k in labels]])
        res = chi2_contingency(table, correction=False)
        chi2, p_value = float(res.statistic), float(res.pvalue)
    return DriftReport(
        statistics=tuple(results),
        chi2_statistic=chi2,
        chi2_p_value=p_value,
        label_counts_reference=ref_counts,
        label_counts_current=cur_counts,
        n_reference=len(reference_stats),
        n_current=len(current_stats),
        config=config,
        skipped=tuple(skipped),
    )


# --- HTML --------------------------------------------------------------------------


def _page(body: str, verdict: str) -> str:
    """A whole drift page around ``body`` (HTML kiln rendered, embedded as is)."""
    return render("drift.html", body=trusted(body), verdict=verdict)


def _report_body(r: DriftReport) -> str:
    return render("drift_body.html", r=r)


def render_no_reference_html(reason: str) -> str:
    """The page written when there is nothing to compare against."""
    return _page(render("drift_body.html", reason=reason), "not checked")


def run_drift(
    clean_path: str | Path,
    store_root: str | Path,
    model_name: str,
    html_out: str | Path,
    action: str = "warn",
    log_metric: Callable[[str, float], None] | None = None,
    config: DriftConfig | None = None,
) -> DriftReport | None:
    """Compare the clean table at ``clean_path`` with the ``stats.parquet`` stored with the
    production version of ``model_name`` in the model store at ``store_root``.

    Writes the HTML report to ``html_out`` (parents created) in every case, before
    raising. Returns None (and says why in the HTML) when there is no production model
    or it has no stored statistics. With ``action == "fail"`` raises DataDriftError,
    naming the drifted statistics, when drift is found; with ``"warn"`` returns the report.
    """
    if action not in ACTIONS:
        raise ValueError(f"drift action must be one of {ACTIONS}, got {action!r}")
    html_out = Path(html_out)
    html_out.parent.mkdir(parents=True, exist_ok=True)
    production = ModelStore(store_root).production(model_name)
    stats_path = production.path / STATS_FILE if production is not None else None
    if production is None or not stats_path.is_file():
        reason = (f"model {model_name!r} has no production version in {store_root}" if production is None
                  else f"production version {production.version} of {model_name!r} has no {STATS_FILE}")
        html_out.write_text(render_no_reference_html(reason), encoding="utf-8")
        if log_metric is not None:
            log_metric("drift_checked", 0)
        return None

    current = reference_statistics(read_table(clean_path, CLEAN_COLUMNS))
    report = compare(current, pd.read_parquet(stats_path), config)
    html_out.write_text(report.render_html(), encoding="utf-8")
    if log_metric is not None:
        log_metric("drift_checked", 1)
        log_metric("reference_version", int(production.version))
        for s in report.statistics:
            log_metric(f"psi_{s.name}", round(s.psi, 6))
        log_metric("label_chi2_p_value", report.chi2_p_value)
        log_metric("drifted", int(report.drifted))
    if report.drifted and action == "fail":
        raise DataDriftError(report, html_out)
    return report
