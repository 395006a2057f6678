"""The model store and deploy: versions in order, an alias that only moves to complete versions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from helpers import tiny_onnx
from kiln.deploy import deploy, git_commit, stamp_metrics
from kiln.store import ModelStore, StoreError, sha256_file


@pytest.fixture()
def onnx_file(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "m.onnx")


def test_deploy_adds_versions_and_moves_production(tmp_path: Path, onnx_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.production("mnist") is None
    v1 = deploy(onnx_file, store.root, "mnist", {"data_version": "abc", "metrics": {"accuracy": 0.97}})
    other = stamp_metrics(onnx_file, tmp_path / "other.onnx", {"retrained": 1})  # another model file
    v2 = deploy(other, store.root, "mnist", {"data_version": "def"})  # no metrics: the file is copied as is
    assert (v1.version, v2.version) == ("1", "2")
    assert store.versions("mnist") == ["1", "2"]
    assert store.production("mnist").version == "2"
    meta = json.loads((v1.path / "model.json").read_text())
    assert meta["data_version"] == "abc" and meta["metrics"]["accuracy"] == 0.97
    assert meta["sha256"] == sha256_file(v1.onnx_path) and meta["git_commit"] and meta["kiln_version"]
    assert json.loads((v2.path / "model.json").read_text())["sha256"] == sha256_file(other)
    assert meta["parameters"] == {"model": "cnn"} and meta["class_labels"] == ["0"]  # from the ONNX metadata


def test_deployed_file_carries_the_test_metrics_and_checksum(tmp_path: Path, onnx_file: Path) -> None:
    import onnx

    version = deploy(onnx_file, tmp_path / "store", "mnist", {"metrics": {"accuracy": 0.97, "f1_macro": 0.96}})
    stored = onnx.load(str(version.onnx_path))
    props = {p.key: p.value for p in stored.metadata_props}
    assert json.loads(props["metrics"]) == {"accuracy": 0.97, "f1_macro": 0.96}
    assert props["train_config"] == '{"model": "cnn"}'  # what export wrote is kept
    assert stored.graph == onnx.load(str(onnx_file)).graph  # only the metadata differs
    assert json.loads((version.path / "model.json").read_text())["sha256"] == sha256_file(version.onnx_path)


def test_alias_cannot_point_at_a_missing_version(tmp_path: Path, onnx_file: Path) -> None:
    store = ModelStore(tmp_path)
    deploy(onnx_file, tmp_path, "mnist", {})
    with pytest.raises(StoreError, match="no version '7'"):
        store.set_alias("mnist", "7")
    assert store.production("mnist").version == "1"


def test_concurrent_deploys_get_distinct_versions(tmp_path: Path, onnx_file: Path) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ModelStore(tmp_path).add_version("m", onnx_file, {}).version))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=int) == [str(i) for i in range(1, 9)]
    assert not list((tmp_path / "m").glob(".staging-*"))


def test_corrupt_alias_and_bad_names_are_errors(tmp_path: Path, onnx_file: Path) -> None:
    deploy(onnx_file, tmp_path, "mnist", {})
    (tmp_path / "mnist" / "production").write_text("latest\n")
    with pytest.raises(StoreError, match="not a version number"):
        ModelStore(tmp_path).production("mnist")
    with pytest.raises(StoreError, match="invalid model name"):
        ModelStore(tmp_path).versions("../etc")


def test_git_commit_prefers_the_image_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_GIT_COMMIT", "deadbeef")
    assert git_commit() == "deadbeef"
    monkeypatch.delenv("KILN_GIT_COMMIT")
    assert git_commit(tmp_path) == "unknown"  # not a git checkout


def test_deploy_stores_the_shipped_variants_only(tmp_path: Path, onnx_file: Path) -> None:
    variants_dir = tmp_path / "variants"
    variants_dir.mkdir()
    int8 = variants_dir / "m.int8.onnx"
    int8.write_bytes(onnx_file.read_bytes())
    report = {"variants": {
        "int8": {"path": "/elsewhere/when/exported/m.int8.onnx", "ships": True, "accuracy": 0.98,
                 "accuracy_drop": 0.001, "method": "static QDQ", "bytes": 10},
        "fp16": {"path": None, "ships": False, "accuracy_drop": 0.02, "reason": "accuracy drop 2.00 points > 0.30"},
    }}
    (variants_dir / "variants.json").write_text(json.dumps(report))
    version = deploy(onnx_file, tmp_path / "store", "mnist", {}, variants_dir=variants_dir)
    assert version.variants == ["int8"]
    path, sha = version.model_file("int8")
    assert path == version.path / "model.int8.onnx" and sha == sha256_file(int8)
    assert version.meta["variants"]["int8"] == {"accuracy": 0.98, "accuracy_drop": 0.001, "method": "static QDQ",
                                                "file": "model.int8.onnx", "sha256": sha}
    with pytest.raises(StoreError, match="has no 'fp16' variant \\(it has \\['int8'\\]\\)"):
        version.model_file("fp16")

    int8.unlink()  # shipped but lost on the way: refuse rather than deploy without it
    with pytest.raises(FileNotFoundError, match="variant int8 shipped but .*m.int8.onnx is missing"):
        deploy(onnx_file, tmp_path / "store", "mnist", {}, variants_dir=variants_dir)
    assert ModelStore(tmp_path / "store").versions("mnist") == ["1"]
