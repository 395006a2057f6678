"""`kiln data add`: a labelled batch lands in data/, DVC records a new version, no overwrite."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from helpers import commit_data, dvc, init_dvc_repo, mnist_subset
from kiln.cli import main
from kiln.data import AddError, add_images, encode_png, write_dataset

pytestmark = pytest.mark.slow  # real DVC repositories


def _md5(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def _manifest(root: Path) -> list[list[str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def digits():
    return mnist_subset(per_class=2)  # 20 real digits


@pytest.fixture()
def repo(tmp_path: Path, digits) -> Path:
    repo = init_dvc_repo(tmp_path / "repo")
    images, labels = digits
    write_dataset(repo / "data", images[:10], labels[:10])  # ids 00000..00009
    commit_data(repo, "data v1")
    return repo


def test_add_folder_batch_updates_data_and_dvc(repo: Path, tmp_path: Path, digits, capsys: pytest.CaptureFixture) -> None:
    images, labels = digits
    batch = write_dataset(tmp_path / "batch", images[10:], labels[10:], ids=[f"b{i:03d}" for i in range(10)])
    before = _md5(repo)
    assert main(["data", "add", str(batch), "--root", str(repo / "data")]) == 0

    out = capsys.readouterr().out
    assert "git add" in out and "data.dvc" in out and "git commit" in out and "dvc push" in out
    assert _md5(repo) != before
    rows = _manifest(repo / "data")
    assert rows[0] == ["id", "label"] and len(rows) == 21
    assert rows[11:] == [[f"b{i:03d}", str(int(labels[10 + i]))] for i in range(10)]
    for i in range(10):
        assert (repo / "data" / "images" / f"b{i:03d}.png").read_bytes() == encode_png(images[10 + i])
    assert "changed" not in dvc(repo, "status", "data.dvc")  # the workspace matches the new data.dvc


def test_add_csv_batch_with_paths(repo: Path, tmp_path: Path, digits) -> None:
    images, labels = digits
    (tmp_path / "incoming" / "sub").mkdir(parents=True)
    lines = ["path,label"]
    for i in (10, 11):
        (tmp_path / "incoming" / "sub" / f"scan{i}.png").write_bytes(encode_png(images[i]))
        lines.append(f"sub/scan{i}.png,{labels[i]}")
    (tmp_path / "incoming" / "batch.csv").write_text("\n".join(lines) + "\n")
    assert add_images(tmp_path / "incoming" / "batch.csv", repo / "data") == ["scan10", "scan11"]
    assert (repo / "data" / "images" / "scan11.png").is_file()
    assert _manifest(repo / "data")[-1] == ["scan11", str(labels[11])]


def test_collision_is_refused_and_nothing_is_written(repo: Path, tmp_path: Path, digits, capsys: pytest.CaptureFixture) -> None:
    images, labels = digits
    original = (repo / "data" / "images" / "00003.png").read_bytes()
    manifest_before, md5_before = (repo / "data" / "labels.csv").read_text(), _md5(repo)
    batch = write_dataset(tmp_path / "batch", images[10:13], labels[10:13], ids=["new1", "00003", "new2"])

    assert main(["data", "add", str(batch), "--root", str(repo / "data")]) == 2
    err = capsys.readouterr().err
    assert "00003" in err and "already in" in err and "nothing was added" in err
    assert (repo / "data" / "images" / "00003.png").read_bytes() == original
    assert not (repo / "data" / "images" / "new1.png").exists()
    assert (repo / "data" / "labels.csv").read_text() == manifest_before and _md5(repo) == md5_before


def test_bad_batches_are_refused(repo: Path, tmp_path: Path, digits) -> None:
    images, labels = digits
    batch = write_dataset(tmp_path / "dup", images[10:12], labels[10:12], ids=["x1", "x1"])
    with pytest.raises(AddError, match="more than once: x1"):
        add_images(batch, repo / "data")
    bad_label = write_dataset(tmp_path / "bad", images[10:11], [3], ids=["y1"])
    (bad_label / "labels.csv").write_text("id,label\ny1,11\n")
    with pytest.raises(AddError, match="label '11'"):
        add_images(bad_label, repo / "data")
    (bad_label / "labels.csv").write_text("id,label\ny2,1\n")
    with pytest.raises(AddError, match="no image file for id 'y2'"):
        add_images(bad_label, repo / "data")
    assert len(_manifest(repo / "data")) == 11
