"""The DVC-tracked dataset: byte-for-byte bootstrap and ingest by revision, for real."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import REPO_ROOT, commit_data, dvc, init_dvc_repo, mnist_subset, sh
from kiln.data import bootstrap, write_dataset
from kiln.ingest import IngestError, ResolvedData, ingest, resolve, with_credentials

pytestmark = pytest.mark.slow  # real DVC repositories and remotes, one per test


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
    dirty = ingest(str(repo), "", tmp_path / "b.parquet").data_version
    assert dirty.startswith(versioned_repo["v2"] + "+dirty.")
    # another edit is another version (so another cache key), the same edit the same one
    (repo / "data" / "images" / "00001.png").write_bytes(b"changed too")
    assert resolve(str(repo), "").data_version not in (dirty, versioned_repo["v2"])
    (repo / "data" / "images" / "00001.png").unlink()
    assert resolve(str(repo), "") == resolve(str(repo), "")


def test_resolve_pins_branches_tags_and_the_default_branch(versioned_repo: dict, tmp_path: Path) -> None:
    repo = versioned_repo["repo"]
    head = sh(repo, "git", "rev-parse", "HEAD").strip()
    v1_commit = sh(repo, "git", "rev-parse", "v1^{commit}").strip()
    assert resolve(str(repo), "v1") == ResolvedData(v1_commit, versioned_repo["v1"])  # a tag
    assert resolve(str(repo), "main") == ResolvedData(head, versioned_repo["v2"])  # a branch, as it is now
    assert resolve(str(repo), head) == ResolvedData(head, versioned_repo["v2"])  # a commit
    # a local checkout's "" is its workspace (commit ""); a URL's "" is its default branch
    assert resolve(str(repo), "") == ResolvedData("", versioned_repo["v2"])
    assert resolve(f"file://{repo}", "") == ResolvedData(head, versioned_repo["v2"])
    # resolve reads no data: a clone without the DVC cache resolves without a remote fetch
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert resolve(str(clone), "v1").data_version == versioned_repo["v1"]


def test_ingest_refuses_data_other_than_resolved(versioned_repo: dict, tmp_path: Path) -> None:
    repo = str(versioned_repo["repo"])
    pinned = resolve(repo, "v1")
    assert ingest(repo, pinned.commit, tmp_path / "a.parquet", expected_version=pinned.data_version).n_rows == 20
    with pytest.raises(IngestError, match="the data changed during the run"):
        ingest(repo, "v2", tmp_path / "b.parquet", expected_version=pinned.data_version)


def test_git_credentials_go_into_https_urls_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KILN_GIT_PASSWORD", raising=False)
    assert with_credentials("https://git.example/team/data.git") == "https://git.example/team/data.git"
    monkeypatch.setenv("KILN_GIT_USERNAME", "bot")
    monkeypatch.setenv("KILN_GIT_PASSWORD", "s3cr/t")
    assert with_credentials("https://git.example/team/data.git") == "https://bot:s3cr%2Ft@git.example/team/data.git"
    for unchanged in ("git@git.example:team/data.git", "/srv/data", "https://me:pw@git.example/d.git"):
        assert with_credentials(unchanged) == unchanged
    # a failed clone names the repository but never the password
    with pytest.raises(IngestError) as error:
        resolve(f"https://127.0.0.1:9/{tmp_path.name}.git", "main")
    assert "127.0.0.1:9" in str(error.value) and "s3cr" not in str(error.value)


def test_ingest_errors_are_clear(versioned_repo: dict, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no-such-tag"):
        ingest(str(versioned_repo["repo"]), "no-such-tag", tmp_path / "x.parquet")
    plain = tmp_path / "plain"
    init_dvc_repo(plain)
    with pytest.raises(IngestError, match="data"):
        ingest(str(plain), "", tmp_path / "y.parquet")
