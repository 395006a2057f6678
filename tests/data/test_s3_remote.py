"""The DVC data over a real S3 API: moto's server on loopback (a subprocess, in its auth
mode so credentials are checked), pushed to from one repo and ingested from a fresh
clone with credentials from the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from helpers import commit_data, dvc, init_dvc_repo, mnist_subset, sh
from kiln.data import write_dataset
from kiln.ingest import IngestError, ingest

pytestmark = pytest.mark.slow  # moto's S3 server in a subprocess, DVC push and a fresh clone

BUCKET = "kiln-data"
REMOTE = "storage"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    """moto's S3 server on a loopback port; the first 3 requests need no credentials
    (they create an IAM user, its policy and its key), every later one is checked."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                assert proc.poll() is None, "moto server exited"
                time.sleep(0.05)
        anon = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="kiln")
        iam.put_user_policy(UserName="kiln", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="kiln")["AccessKey"]
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
        yield {"url": url, "creds": creds}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def pushed(s3: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A data repo whose S3 remote holds tag v1 (12 digits), pushed with env credentials."""
    root = tmp_path_factory.mktemp("s3repo")
    repo = init_dvc_repo(root / "repo")
    dvc(repo, "remote", "add", "-d", REMOTE, f"s3://{BUCKET}/dvc")
    dvc(repo, "remote", "modify", REMOTE, "endpointurl", s3["url"])
    dvc(repo, "remote", "modify", REMOTE, "region", "us-east-1")
    images, labels = mnist_subset(per_class=1, offset=0)
    write_dataset(repo / "data", images, labels)
    md5 = commit_data(repo, "data v1", tag="v1")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3["creds"].items():
            mp.setenv(k, v)
        dvc(repo, "push", "-q")
    return {"repo": repo, "md5": md5, "labels": labels, "root": root}


def fresh_clone(pushed: dict, name: str) -> Path:
    clone = pushed["root"] / name
    sh(pushed["root"], "git", "clone", "-q", str(pushed["repo"]), str(clone))
    assert not (clone / ".dvc" / "cache").exists()
    return clone


def test_push_then_ingest_from_a_fresh_clone_with_env_credentials(pushed: dict, s3: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3["creds"].items():
        monkeypatch.setenv(k, v)
    result = ingest(str(fresh_clone(pushed, "clone-ok")), "v1", tmp_path / "raw.parquet")
    assert result.data_version == pushed["md5"]
    raw = pd.read_parquet(tmp_path / "raw.parquet")
    assert raw["label"].tolist() == [str(v) for v in pushed["labels"]] and raw["png"].notna().all()


def assert_one_line_naming_the_remote(error: IngestError) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert REMOTE in message and f"s3://{BUCKET}/dvc" in message, message


def test_bad_credentials_give_one_line_naming_the_remote(pushed: dict, s3: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["creds"]["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(IngestError) as e:
        ingest(str(fresh_clone(pushed, "clone-badkey")), "v1", tmp_path / "raw.parquet")
    assert_one_line_naming_the_remote(e.value)
    assert not (tmp_path / "raw.parquet").exists()


def test_unreachable_endpoint_gives_one_line_naming_the_remote(pushed: dict, s3: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3["creds"].items():
        monkeypatch.setenv(k, v)
    clone = fresh_clone(pushed, "clone-unreachable")
    dvc(clone, "remote", "modify", "--local", REMOTE, "endpointurl", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(IngestError) as e:
        ingest(str(clone), "v1", tmp_path / "raw.parquet")
    assert_one_line_naming_the_remote(e.value)
    assert time.monotonic() - start < 60
