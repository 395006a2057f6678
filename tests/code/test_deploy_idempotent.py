"""Deploy is idempotent: the same model file never becomes a second version."""

from __future__ import annotations

from pathlib import Path

from helpers import tiny_onnx
from kiln.deploy import deploy_once, stamp_metrics
from kiln.store import ModelStore, sha256_file


def test_the_same_model_blessed_again_adds_no_version(tmp_path: Path, caplog) -> None:
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    store = ModelStore(tmp_path / "store")
    v1, added = deploy_once(onnx_file, store.root, "mnist", {"metrics": {"accuracy": 0.97}})
    assert (v1.version, added) == ("1", True)
    # evaluated again: same file, same metrics stamped -> still version 1
    again, added = deploy_once(onnx_file, store.root, "mnist", {"metrics": {"accuracy": 0.97}})
    assert (again.version, added) == ("1", False)
    assert store.versions("mnist") == ["1"] and store.production("mnist").version == "1"
    assert "no version added" in caplog.text and "stays production" in caplog.text
    other = stamp_metrics(onnx_file, tmp_path / "other.onnx", {"retrained": 1})
    v2, added = deploy_once(other, store.root, "mnist", {})
    assert (v2.version, added) == ("2", True) and store.production("mnist").version == "2"


def test_a_retried_deploy_finishes_the_first_attempt_instead_of_duplicating(tmp_path: Path) -> None:
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    store = ModelStore(tmp_path / "store")
    deploy_once(onnx_file, store.root, "mnist", {})
    other = stamp_metrics(onnx_file, tmp_path / "other.onnx", {"retrained": 1})
    # the first attempt died after storing version 2, before moving the alias
    store.add_version("mnist", other, {"source_sha256": sha256_file(other)})
    assert store.production("mnist").version == "1"
    version, added = deploy_once(other, store.root, "mnist", {})
    assert (version.version, added) == ("2", False)
    assert store.versions("mnist") == ["1", "2"] and store.production("mnist").version == "2"
