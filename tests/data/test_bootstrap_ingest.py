"""The DVC-tracked dataset: byte-for-byte bootstrap and ingest by revision, for real."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import REPO_ROOT, commit_data, dvc, init_dvc_repo, mnist_subset, sh
from kiln.data import bootstrap, write_dataset
from kiln.ingest import IngestError, ingest


def test_bootstrap_matches_committed_data_dvc(tmp_path: Path) -> None:
    committed = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"][0]
    repo = init_dvc_repo(tmp_path / "repo")
    bootstrap(repo / "data")
    md5 = commit_data(repo, "bootstrap")
    assert md5 + ".dir" == committed["md5"]
    assert committed["nfiles"] == 5001  # 5,000 PNGs + labels.csv
    labels = pd.read_csv(repo / "data" / "labels.csv", dtype={"id": str})
    assert list(labels.columns) == ["id", "label"] and len(labels) == 5000
    assert sorted(labels["label"].unique()) == list(range(10))


@pytest.fixture()
def versioned_repo(tmp_path: Path) -> dict:
    """A git repo with a local DVC remote; tag v1 has 20 digits, v2 adds 10 more and relabels none."""
    remote = tmp_path / "remote"
    repo = init_dvc_repo(tmp_path / "repo", remote)
    images, labels = mnist_subset(per_class=3)
    write_dataset(repo / "data", images[:20], labels[:20])
    v1 = commit_data(repo, "data v1", tag="v1")
    write_dataset(repo / "data", images, labels)
    v2 = commit_data(repo, "data v2", tag="v2")
    dvc(repo, "push", "-q", "--all-tags")
    return {"repo": repo, "remote": remote, "v1": v1, "v2": v2, "images": images, "labels": labels}


def test_ingest_by_revision_returns_that_revisions_files(versioned_repo: dict, tmp_path: Path) -> None:
    repo = versioned_repo["repo"]
    for rev, n in (("v1", 20), ("v2", 30)):
        out = tmp_path / f"{rev}.parquet"
        result = ingest(str(repo), rev, out)
        assert result.data_version == versioned_repo[rev]
        assert result.n_rows == result.n_files == result.n_manifest == n
        raw = pd.read_parquet(out)
        assert sorted(raw["id"]) == [f"{i:05d}" for i in range(n)]
        assert raw["label"].tolist() == [str(v) for v in versioned_repo["labels"][:n]]
    assert versioned_repo["v1"] != versioned_repo["v2"]


def test_ingest_from_remote_only_checkout(versioned_repo: dict, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(versioned_repo["repo"]), str(clone))
    assert not (clone / "data").exists() and not (clone / ".dvc" / "cache").exists()
    result = ingest(str(clone), "v1", tmp_path / "raw.parquet")
    assert result.data_version == versioned_repo["v1"] and result.n_files == 20
    png = pd.read_parquet(tmp_path / "raw.parquet")["png"].iloc[0]
    assert png == (versioned_repo["repo"] / "data" / "images" / "00000.png").read_bytes()


def test_ingest_workspace_marks_uncommitted_changes_dirty(versioned_repo: dict, tmp_path: Path) -> None:
    repo = versioned_repo["repo"]
    assert ingest(str(repo), "", tmp_path / "a.parquet").data_version == versioned_repo["v2"]
    (repo / "data" / "images" / "00000.png").write_bytes(b"changed")
    assert ingest(str(repo), "", tmp_path / "b.parquet").data_version == versioned_repo["v2"] + "+dirty"


def test_ingest_errors_are_clear(versioned_repo: dict, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no-such-tag"):
        ingest(str(versioned_repo["repo"]), "no-such-tag", tmp_path / "x.parquet")
    plain = tmp_path / "plain"
    init_dvc_repo(plain)
    with pytest.raises(IngestError, match="data"):
        ingest(str(plain), "", tmp_path / "y.parquet")
