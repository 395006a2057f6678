"""Fixtures for the page tests: one small real run (the steps' own file-level entry points
on 500 real digits plus a few broken files, no pipeline runner), and headless Chromium.

``tiny_run`` runs ingest-shaped data through clean, validate, split, train (MLP, 2
epochs), export (+ variants), drift, evaluate and deploy, twice: the second run finds the
first run's model in production, so it has a drift reference and a champion.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import mnist_subset

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MODEL = "mnist"
LOW_BAR = {"min_accuracy": 0.5, "min_macro_recall": 0.5, "min_class_recall": 0.1}


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def raw_table(per_class: int = 50) -> pd.DataFrame:
    """An ingested (raw) table of real digits plus one row per kind of breakage."""
    images, labels = mnist_subset(per_class)
    rows = [{"id": f"{i:05d}", "label": str(int(y)), "path": f"images/{i:05d}.png", "png": _png(x), "in_manifest": True}
            for i, (x, y) in enumerate(zip(images, labels))]
    broken = {
        "empty": (b"", "3"),
        "truncated": (_png(images[1])[:60], "1"),
        "text": (b"not a png at all", "2"),
        "big": (_png(np.full((40, 40), 200, np.uint8)), "4"),
        "copy": (_png(images[0]), str(int(labels[0]))),
        "nolabel": (_png(images[2]), None),
    }
    rows += [{"id": f"bad-{name}", "label": label, "path": f"images/bad-{name}.png", "png": png, "in_manifest": True}
             for name, (png, label) in broken.items()]
    return pd.DataFrame(rows)


@dataclass
class Run:
    """One run's artifact paths and the metadata dicts the steps logged."""

    dir: Path
    data_version: str
    paths: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    blessed: bool = False
    deployed_version: str | None = None
    evaluation: Any = None
    validation: Any = None


def run_steps(work: Path, raw_path: Path, store: Path, thresholds: dict[str, float], deploy: bool) -> Run:
    """The steps of the pipeline, each through its file-level entry point, as the components call them."""
    from kiln.clean import run_clean
    from kiln.export import run_export, run_export_variants
    from kiln.split import SplitConfig, run_split
    from kiln.train import run_train
    from kiln.validate import ValidationConfig, run_validation

    run = Run(work, data_version="md5:feedc0de")
    p = run.paths = {name: work / name for name in (
        "cleaned.parquet", "quarantine.csv", "repairs.csv", "summary.md", "validation.html", "suite.json",
        "drift.html", "train.parquet", "val.parquet", "test.parquet", "model.pt", "curves.html", "model.onnx",
        "variants", "predictions.csv", "verdict.md", "evaluation.html")}
    p["raw"] = raw_path
    m = run.metrics = {name: {} for name in ("validation", "drift", "curves", "onnx", "evaluation")}
    run_clean(raw_path, p["cleaned.parquet"], p["quarantine.csv"], summary_path=p["summary.md"],
              repairs_path=p["repairs.csv"])
    run.validation = run_validation(p["cleaned.parquet"], p["validation.html"], p["suite.json"],
                                    ValidationConfig(min_rows=100), log_metric=m["validation"].__setitem__)
    run_split(p["cleaned.parquet"], {s: p[f"{s}.parquet"] for s in ("train", "val", "test")},
              SplitConfig(val_fraction=0.2, test_fraction=0.2))
    run_train(p["train.parquet"], p["val.parquet"], p["model.pt"],
              {"model": "mlp", "epochs": 3, "seed": 0, "device": "cpu", "amp": False,
               "max_shift": 0, "max_rotation": 0.0},
              log_metric=m["curves"].__setitem__, curves_path=p["curves.html"])
    export = run_export(p["model.pt"], p["model.onnx"], p["test.parquet"], {"data_version": run.data_version})
    m["onnx"] = {"framework": "onnx", "opset": export.opset, "parity_max_abs_diff": export.max_abs_diff}
    run_export_variants(p["model.onnx"], p["variants"], p["test.parquet"], calibration_path=p["val.parquet"])
    return tail(run, store, thresholds, deploy)


def tail(run: Run, store: Path, thresholds: dict[str, float], deploy: bool) -> Run:
    """The steps that depend on the model store: drift, evaluate and (when blessed) deploy."""
    from kiln.deploy import deploy as run_deploy
    from kiln.drift import run_drift
    from kiln.evaluate import production_onnx_path, run_evaluate

    p, m = run.paths, run.metrics
    run_drift(p["cleaned.parquet"], store, MODEL, p["drift.html"], "warn", log_metric=m["drift"].__setitem__)
    run.evaluation = run_evaluate(p["model.onnx"], p["test.parquet"], p["predictions.csv"], p["verdict.md"], thresholds,
                                  log_metric=m["evaluation"].__setitem__,
                                  champion_onnx_path=production_onnx_path(store, MODEL), tolerance=0.005,
                                  report_path=p["evaluation.html"])
    run.blessed = run.evaluation.blessed
    if deploy and run.blessed:
        version = run_deploy(p["model.onnx"], store, MODEL, {"data_version": run.data_version, "metrics": m["evaluation"]},
                             reference_clean_path=p["cleaned.parquet"], variants_dir=p["variants"])
        run.deployed_version = version.version
    return run


def rerun(run: Run, work: Path, new_model: bool = False) -> Run:
    """A new run sharing ``run``'s outputs up to export; its own drift/evaluate/deploy outputs go to ``work``.

    ``new_model``: the run's model is a copy of ``run``'s with one more metadata entry, so
    its sha256 differs and deploy (idempotent on sha256) adds it as a new version.
    """
    import onnx

    own = ("drift.html", "predictions.csv", "verdict.md", "evaluation.html")
    paths = {name: (work / name if name in own else path) for name, path in run.paths.items()}
    if new_model:
        work.mkdir(parents=True, exist_ok=True)
        proto = onnx.load(str(run.paths["model.onnx"]))
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, "run": work.name})
        paths["model.onnx"] = work / "model.onnx"
        onnx.save(proto, str(paths["model.onnx"]))
    metrics = {name: (dict(v) if name in ("validation", "curves", "onnx") else {}) for name, v in run.metrics.items()}
    return Run(work, run.data_version, paths, metrics, validation=run.validation)


@dataclass(frozen=True)
class TinyRuns:
    store: Path
    first: Run  # no production model yet: no drift reference, no champion; blessed and deployed
    second: Run  # against the first: drift checked, champion compared; blessed and deployed
    rejected: Run  # thresholds it cannot meet: not blessed, not deployed


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    root = tmp_path_factory.mktemp("tiny-run")
    raw_path = root / "raw.parquet"
    raw_table().to_parquet(raw_path, index=False)
    store = root / "store"
    first = run_steps(root / "run1", raw_path, store, LOW_BAR, deploy=True)
    # Later runs on the same data reuse the first run's steps up to export, as a pipeline
    # run with caching does, and redo those that read the model store.
    second = tail(rerun(first, root / "run2", new_model=True), store, LOW_BAR, deploy=True)
    rejected = tail(rerun(first, root / "run3"), store, {**LOW_BAR, "min_accuracy": 0.9999}, deploy=True)
    assert first.deployed_version == "1", first.evaluation.reasons
    assert second.deployed_version == "2" and rejected.deployed_version is None
    return TinyRuns(store, first, second, rejected)


@pytest.fixture(scope="session")
def report_of(tiny_runs: TinyRuns):
    """``report_of(run)``: the RunReport of one tiny run, collected from its files as the report step does."""
    from kiln.report import Lineage, collect_run

    def make(run: Run):
        p, m = run.paths, run.metrics
        lineage = Lineage(git_commit="0123456789abcdef", data_version=run.data_version,
                          parameters={"model_type": "mlp", "epochs": 3, "min_class_recall": LOW_BAR["min_class_recall"]},
                          data_repo="/srv/data", data_rev="v1", run=run.dir.name)
        return collect_run(
            lineage, raw=p["raw"], cleaned=p["cleaned.parquet"], quarantine=p["quarantine.csv"],
            repairs=p["repairs.csv"], validation_metrics=m["validation"], drift_metrics=m["drift"],
            curves_metrics=m["curves"], onnx_metadata=m["onnx"], variants_dir=p["variants"],
            eval_metrics=m["evaluation"], predictions=p["predictions.csv"], verdict=p["verdict.md"],
            blessed=run.blessed, deployed_version=run.deployed_version, model_store=tiny_runs.store,
            model_name=MODEL)

    return make


# --- headless Chromium ------------------------------------------------------------------


def _chromium_missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is absent (Debian package 'chromium': apt-get install -y chromium)"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium (the system's, driven by Playwright). Outside CI a missing browser
    skips the test; in CI (``CI`` set) it fails it, since .ci/run installs it."""
    missing = _chromium_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need Chromium in CI: {missing}")
        pytest.skip(f"browser tests skipped outside CI: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that may load nothing but file: and loopback URLs: anything else fails the test."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    escaped: list[str] = []

    def guard(route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:", "http://127.0.0.1")):
            route.continue_()
        else:
            escaped.append(url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()
    assert not escaped, f"the page tried to load from the network: {escaped}"

