"""Every user mistake the CLI knows of ends with one line on stderr saying what is wrong and
what to do, a non-zero exit code and no traceback. The real `kiln` runs as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT, commit_data, dvc, init_dvc_repo, mnist_subset, sh
from kiln.data import write_dataset

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "DVC_NO_ANALYTICS": "1"}


def kiln(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=cwd, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line(result: tuple[int, str, str], code: int, *phrases: str) -> str:
    rc, out, err = result
    assert "Traceback" not in out + err, out + err
    assert rc == code, (rc, out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for phrase in phrases:
        assert phrase in err, err
    return err


def run_args(repo: Path, work: Path, *extra: str) -> list[str]:
    return ["run", "--data-repo", str(repo), "--model-store", str(work / "store"), "--runs-dir", str(work / "runs"),
            *extra]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC repository with 10 committed digits (tag v1)."""
    repo = init_dvc_repo(tmp_path_factory.mktemp("errors") / "repo")
    images, labels = mnist_subset(per_class=1)
    write_dataset(repo / "data", images, labels)
    commit_data(repo, "data", tag="v1")
    return repo


def test_data_changed_without_dvc_add(repo: Path, tmp_path: Path) -> None:
    labels = repo / "data" / "labels.csv"
    before = labels.read_text()
    labels.write_text(before + "99999,3\n")
    try:
        assert_one_line(kiln(*run_args(repo, tmp_path)), 2, "differs from data.dvc", "`dvc add data`",
                        "--allow-dirty")
    finally:
        labels.write_text(before)
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_unknown_data_revision(repo: Path, tmp_path: Path) -> None:
    assert_one_line(kiln(*run_args(repo, tmp_path, "--data-rev", "v9")), 2, "unknown Git revision 'v9'",
                    "pass --data-rev a tag, branch or commit")


@pytest.mark.parametrize("option, phrase", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--model-type", "foo"], "invalid choice: 'foo'"),
    (["--min-accuracy", "95"], "--min-accuracy must be between 0 and 1"),
])
def test_bad_parameter_value(repo: Path, tmp_path: Path, option: list[str], phrase: str) -> None:
    err = assert_one_line(kiln(*run_args(repo, tmp_path, *option)), 2, phrase)
    assert err.startswith("kiln run: ")


def test_unreachable_remote_fails_the_ingest_step_with_its_own_line(repo: Path, tmp_path: Path) -> None:
    """The data is only on an S3 remote nobody listens for: resolve passes (it reads git),
    ingest fails; the user sees ingest's own error, not kfp's FAILURE traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    dvc(clone, "remote", "add", "-d", "--local", "storage", "s3://kiln-data/dvc")
    dvc(clone, "remote", "modify", "--local", "storage", "endpointurl", f"http://127.0.0.1:{closed}")
    env = {**ENV, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_EC2_METADATA_DISABLED": "true"}
    rc, out, err = result = kiln(*run_args(clone, tmp_path, "--data-rev", "v1"), env=env, timeout=300)
    assert_one_line(result, 1, "kiln run: step 'ingest' failed: IngestError: cannot fetch 'data'",
                    "DVC remote 'storage' (s3://kiln-data/dvc)", "full log: ")
    log = Path(err.rsplit("full log: ", 1)[1].rstrip(")\n"))
    assert log.is_file() and "Traceback" in log.read_text()  # the whole story is in the run's log
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["resolve", "ran"], ["ingest", "FAILED"]]


def test_missing_model_store(tmp_path: Path) -> None:
    assert_one_line(kiln("serve", "--store", str(tmp_path / "nonexistent")), 2, "no model store at",
                    "pass --store")
    assert_one_line(kiln("models", "list", "--store", str(tmp_path / "nonexistent")), 2, "no model store at")


def test_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line(kiln("serve", "--store", str(tmp_path), "--port", str(port)), 2,
                        f"port {port} on 127.0.0.1 is already in use", "--port")
