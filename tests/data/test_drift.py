"""Data drift: PSI per image statistic and chi-square on labels, against real MNIST digits."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from helpers import clean_frame, mnist_subset, tiny_onnx
from kiln.dataset import write_table
from kiln.drift import (
    REFERENCE_COLUMNS,
    STATS_FILE,
    DataDriftError,
    DriftConfig,
    compare,
    psi,
    reference_statistics,
    run_drift,
    save_reference_statistics,
)
from kiln.store import ModelStore


@pytest.fixture(scope="module")
def digits() -> dict:
    """Two disjoint samples of real digits, 150 per class each."""
    ref_images, ref_labels = mnist_subset(per_class=150, offset=0)
    cur_images, cur_labels = mnist_subset(per_class=150, offset=150)
    return {
        "ref_images": ref_images, "ref_labels": ref_labels,
        "cur_images": cur_images, "cur_labels": cur_labels,
        "reference": reference_statistics(clean_frame(ref_images, ref_labels)),
    }


def _stats(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    return reference_statistics(clean_frame(images, labels))


def test_reference_statistics_are_compact_and_anonymous(digits: dict) -> None:
    ref = digits["reference"]
    assert tuple(ref.columns) == REFERENCE_COLUMNS
    assert len(ref) == 1500 and not {"id", "content_hash", "computed_sha256"} & set(ref.columns)


def test_identical_distributions_do_not_drift(digits: dict) -> None:
    report = compare(_stats(digits["cur_images"], digits["cur_labels"]), digits["reference"])
    assert not report.drifted and report.drifted_statistics == []
    assert max(report.psi.values()) < DriftConfig().psi_warn, report.psi
    assert report.chi2_p_value > 0.5  # identical label counts
    assert set(report.psi) == set(DriftConfig().statistics)


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        (lambda x: np.clip(x.astype(np.int16) + 60, 0, 255).astype(np.uint8), {"mean", "min"}),  # brightened
        (lambda x: 255 - x, {"mean", "ink_fraction"}),  # inverted
    ],
    ids=["brightened", "inverted"],
)
def test_shifted_intensities_drift_and_are_named(digits: dict, transform, expected: set[str]) -> None:
    report = compare(_stats(transform(digits["cur_images"]), digits["cur_labels"]), digits["reference"])
    assert report.drifted
    assert expected <= set(report.drifted_statistics), report.psi
    assert all(report.psi[name] >= DriftConfig().psi_fail for name in expected)
    assert "label" not in report.drifted_statistics  # the labels did not change
    html = report.render_html()
    assert "DRIFT in" in html and all(name in html for name in expected)


def test_removed_class_is_flagged_by_chi_square(digits: dict) -> None:
    keep = digits["cur_labels"] != 7
    report = compare(_stats(digits["cur_images"][keep], digits["cur_labels"][keep]), digits["reference"])
    assert report.drifted_statistics == ["label"]  # the images themselves look the same
    assert report.chi2_p_value < DriftConfig().chi2_p_value
    assert 7 not in report.label_counts_current and report.label_counts_reference[7] == 150


def test_psi_bins_and_epsilon() -> None:
    constant = np.full(200, 28.0)
    assert psi(constant, constant) == (0.0, 3)  # below / equal / above the reference value
    value, bins = psi(constant, np.full(200, 27.0))  # all mass in a bin the reference never used
    assert bins == 3 and 10 < value < 100  # large but finite thanks to the epsilon floor
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    assert psi(ref, ref)[0] == 0.0 and psi(ref, ref)[1] == 12  # 10 quantile bins + the two outer ones
    assert psi(ref, rng.normal(size=5000))[0] < 0.02
    assert psi(ref, rng.normal(loc=1.0, size=5000))[0] > 0.25


def test_config_is_frozen_and_checked() -> None:
    config = DriftConfig()
    assert (config.psi_warn, config.psi_fail, config.chi2_p_value) == (0.1, 0.25, 0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.psi_fail = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        DriftConfig(psi_warn=0.3, psi_fail=0.2)
    with pytest.raises(ValueError, match="lack columns"):
        compare(pd.DataFrame({"label": [1]}), pd.DataFrame({"label": [1]}))


@pytest.fixture()
def store_with_production(tmp_path: Path, digits: dict) -> dict:
    """A model store whose production version carries stats.parquet of the reference digits."""
    ref_path = write_table(clean_frame(digits["ref_images"], digits["ref_labels"]), tmp_path / "train.parquet")
    store = ModelStore(tmp_path / "store")
    version = store.add_version("digits", tiny_onnx(tmp_path / "m.onnx"), {"data_version": "x"})
    stats_path = save_reference_statistics(ref_path, version.path)
    store.set_alias("digits", version.version)
    same = write_table(clean_frame(digits["cur_images"], digits["cur_labels"]), tmp_path / "same.parquet")
    inverted = write_table(clean_frame(255 - digits["cur_images"], digits["cur_labels"]), tmp_path / "inv.parquet")
    return {"root": tmp_path / "store", "stats": stats_path, "same": same, "inverted": inverted, "store": store}


def test_save_reference_statistics_writes_stats_parquet(store_with_production: dict, digits: dict) -> None:
    stats_path = store_with_production["stats"]
    assert stats_path.name == STATS_FILE and stats_path.parent == store_with_production["store"].production("digits").path
    pd.testing.assert_frame_equal(pd.read_parquet(stats_path), digits["reference"])
    assert [p.name for p in stats_path.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_run_drift_fail_raises_after_writing_html(store_with_production: dict, tmp_path: Path) -> None:
    html = tmp_path / "out" / "drift.html"
    metrics: dict[str, float] = {}
    with pytest.raises(DataDriftError, match="data drift in .*mean") as info:
        run_drift(store_with_production["inverted"], store_with_production["root"], "digits", html, "fail",
                  log_metric=metrics.__setitem__)
    assert "ink_fraction" in str(info.value) and info.value.report.drifted
    assert "DRIFT in" in html.read_text()
    assert metrics["drifted"] == 1 and metrics["psi_mean"] >= 0.25 and metrics["reference_version"] == 1


def test_run_drift_warn_returns_report(store_with_production: dict, tmp_path: Path) -> None:
    html = tmp_path / "drift.html"
    report = run_drift(store_with_production["inverted"], store_with_production["root"], "digits", html, "warn")
    assert report is not None and report.drifted and "DRIFT in" in html.read_text()
    report = run_drift(store_with_production["same"], store_with_production["root"], "digits", html, "fail")
    assert report is not None and not report.drifted and "no drift" in html.read_text()


def test_run_drift_without_production_or_stats_returns_none(store_with_production: dict, tmp_path: Path) -> None:
    html = tmp_path / "drift.html"
    metrics: dict[str, float] = {}
    assert run_drift(store_with_production["inverted"], tmp_path / "empty-store", "digits", html, "fail",
                     log_metric=metrics.__setitem__) is None
    assert "no production version" in html.read_text() and metrics == {"drift_checked": 0}
    store_with_production["stats"].unlink()
    assert run_drift(store_with_production["inverted"], store_with_production["root"], "digits", html, "fail") is None
    assert "has no stats.parquet" in html.read_text()
    with pytest.raises(ValueError, match="drift action"):
        run_drift(store_with_production["same"], store_with_production["root"], "digits", html, "ignore")


def test_kfp_component_calls_run_drift(store_with_production: dict, tmp_path: Path) -> None:
    from kfp import dsl

    from components.drift import drift

    spec = dsl.component(drift, base_image="kiln:test", install_kfp_package=False).component_spec
    assert set(spec.inputs) == {"cleaned", "model_store", "model_name", "drift_action", "drift_config"}
    assert set(spec.outputs) == {"report", "metrics"}
    report, metrics = SimpleNamespace(path=str(tmp_path / "r.html")), {}
    with pytest.raises(DataDriftError):
        drift(SimpleNamespace(path=str(store_with_production["inverted"])), str(store_with_production["root"]),
              "digits", "fail", {}, report, SimpleNamespace(log_metric=metrics.__setitem__))
    assert Path(report.path).is_file() and metrics["drifted"] == 1
