"""`kiln upload | submit | schedule` against a loopback fake of the KFP v2beta1 REST API.

The fake (kfp_fake.py) accepts only bodies that survive a round trip through the
``kfp_server_api`` models, so these tests check both what kiln sends and that KFP's own
models accept it. What a real cluster then does with the run is not tested here.
"""

# No `from __future__ import annotations`: kfp reads the test pipeline's real types.

import json
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import serve
from kiln.cli import main as kiln

sys.path.insert(0, str(Path(__file__).parent))
from kfp_fake import PREFIX, FakeKfp  # noqa: E402


@pytest.fixture()
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # kfp.Client reads ~/.config/kfp
    for var in ("KF_PIPELINES_SA_TOKEN_PATH", "KFP_HOST", "KFP_TOKEN", "KFP_NAMESPACE", "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeKfp()
    with serve(fake.app()) as server:
        fake.url = server.url
        yield fake
    assert fake.violations == []  # nothing kiln sent was refused by the KFP models


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.training_pipeline import ClusterOptions, compile_pipeline

    return compile_pipeline(tmp_path_factory.mktemp("pkg") / "kiln.yaml", cluster=ClusterOptions(gpus=1))


def cli(api: FakeKfp, *args: str, token: str = "good-token") -> int:
    command = list(args)
    at = 2 if command[0] == "schedule" else 1
    return kiln([*command[:at], "--host", api.url, "--namespace", "team-a", "--token", token, *command[at:]])


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_upload_registers_a_pipeline_then_versions_of_it(api: FakeKfp, package: Path, capsys) -> None:
    assert cli(api, "upload", "--package", str(package), "--version", "abc123") == 0
    assert cli(api, "upload", "--package", str(package), "--version", "def456", "--description", "retrain") == 0
    created = api.sent("POST", "/pipelines")
    assert len(created) == 1 and created[0]["body"] == {"display_name": "kiln-training", "namespace": "team-a"}
    uploads = api.sent("POST", "/pipelines/upload_version")
    assert [u["query"]["name"] for u in uploads] == ["abc123", "def456"]
    assert {u["query"]["pipelineid"] for u in uploads} == set(api.pipelines)  # both into the one pipeline
    assert uploads[0]["files"]["uploadfile"] == package.read_bytes()  # the package itself
    assert "version 'def456' of pipeline 'kiln-training'" in capsys.readouterr().out

    assert cli(api, "upload", "--package", str(package), "--version", "abc123") == 1  # names are unique
    assert one_line_error(capsys).startswith("kiln upload: KFP API 409 Conflict: pipeline version 'abc123' already")


def test_upload_names_the_version_by_the_git_commit(api: FakeKfp, package: Path, monkeypatch) -> None:
    monkeypatch.setenv("KILN_GIT_COMMIT", "0123456789abcdef0123")
    assert cli(api, "upload", "--package", str(package)) == 0
    assert api.sent("POST", "/pipelines/upload_version")[0]["query"]["name"] == "0123456789ab"


def test_submit_sends_the_package_with_checked_params_and_compiled_caching(api: FakeKfp, package: Path) -> None:
    assert cli(api, "submit", "--package", str(package), "--param", "data_repo=https://git.example/d.git",
               "--param", "epochs=3", "--param", "train_gpus=2", "--run-name", "nightly") == 0
    [experiment] = api.sent("POST", "/experiments")
    assert experiment["body"] == {"display_name": "kiln", "namespace": "team-a"}
    [run] = api.sent("POST", "/runs")
    body = run["body"]
    assert body["display_name"] == "nightly" and body["experiment_id"] == next(iter(api.experiments))
    assert body["runtime_config"]["parameters"] == {"data_repo": "https://git.example/d.git", "epochs": 3,
                                                    "train_gpus": 2}
    sent_spec = body["pipeline_spec"]
    assert sent_spec["pipeline_spec"] == next(yaml.safe_load_all(package.read_text()))  # as compiled
    tasks = sent_spec["pipeline_spec"]["root"]["dag"]["tasks"]
    assert tasks["resolve"]["cachingOptions"] == {} and tasks["ingest"]["cachingOptions"] == {"enableCache": True}
    assert run["authorization"] == "Bearer good-token"


@pytest.mark.parametrize(("flag", "enabled"), [("on", True), ("off", False)])
def test_submit_cache_on_or_off_overrides_every_task(api: FakeKfp, package: Path, flag: str, enabled: bool) -> None:
    assert cli(api, "submit", "--package", str(package), "--param", "data_repo=r", "--cache", flag) == 0
    tasks = api.sent("POST", "/runs")[0]["body"]["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert {name: t.get("cachingOptions", {}).get("enableCache", False) for name, t in tasks.items()} == \
        {name: enabled for name in tasks}


def test_params_are_checked_against_the_package_actually_sent(api: FakeKfp, tmp_path: Path, capsys) -> None:
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def echo(word: str) -> str:
        return word

    @dsl.pipeline(name="other")
    def other(word: str, times: int = 1):
        echo(word=word)

    other_package = tmp_path / "other.yaml"
    compiler.Compiler().compile(other, str(other_package))
    assert cli(api, "submit", "--package", str(other_package), "--param", "data_repo=x") == 1
    assert "the pipeline has no parameter 'data_repo'; it has ['times', 'word']" in one_line_error(capsys)
    assert cli(api, "submit", "--package", str(other_package), "--param", "times=two", "--param", "word=a") == 1
    assert "times='two' is not a valid NUMBER_INTEGER" in one_line_error(capsys)
    assert cli(api, "submit", "--package", str(other_package)) == 1
    assert "required parameters missing: ['word']" in one_line_error(capsys)
    assert api.sent("POST", "/runs") == []  # nothing was started
    assert cli(api, "submit", "--package", str(other_package), "--param", "word=hi", "--param", "times=2") == 0
    assert api.sent("POST", "/runs")[0]["body"]["runtime_config"]["parameters"] == {"word": "hi", "times": 2}


def test_submit_an_uploaded_version_checks_params_against_its_spec(api: FakeKfp, package: Path, capsys) -> None:
    assert cli(api, "submit", "--pipeline", "kiln-training", "--param", "data_repo=r") == 1
    assert "no pipeline called 'kiln-training' in namespace team-a" in one_line_error(capsys)
    cli(api, "upload", "--package", str(package), "--version", "v1")
    cli(api, "upload", "--package", str(package), "--version", "v2")
    capsys.readouterr()
    assert cli(api, "submit", "--pipeline", "kiln-training", "--param", "data_repo=r", "--param", "epochs=2") == 0
    [run] = api.sent("POST", "/runs")
    pid = next(iter(api.pipelines))
    newest = api.versions[pid][-1]["pipeline_version_id"]
    assert run["body"]["pipeline_version_reference"] == {"pipeline_id": pid, "pipeline_version_id": newest}
    assert "pipeline_spec" not in run["body"]  # the server's copy runs
    assert cli(api, "submit", "--pipeline", "kiln-training", "--version", "v1", "--param", "epoch=2") == 1
    assert "no parameter 'epoch'" in one_line_error(capsys)
    assert cli(api, "submit", "--pipeline", "kiln-training", "--param", "data_repo=r", "--cache", "on") == 1
    assert "--cache on/off rewrites the spec, so it needs --package" in one_line_error(capsys)


def test_schedule_create_list_pause_resume_delete(api: FakeKfp, package: Path, capsys) -> None:
    assert cli(api, "schedule", "create", "--package", str(package), "--cron", "0 0 3 * * *",
               "--param", "data_repo=https://git.example/d.git", "--param", "data_rev=main") == 0
    [created] = api.sent("POST", "/recurringruns")
    body = created["body"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert (body["max_concurrency"], body["no_catchup"], body["mode"]) == ("1", True, "ENABLE")
    assert body["display_name"] == "kiln-retrain"
    assert body["runtime_config"]["parameters"] == {"data_repo": "https://git.example/d.git", "data_rev": "main"}
    rid = body_id = next(iter(api.recurring))
    assert rid == body_id and f"recurring run {rid}" in capsys.readouterr().out

    assert cli(api, "schedule", "list") == 0
    assert capsys.readouterr().out.split() == [rid, "ENABLE", "0", "0", "3", "*", "*", "*", "kiln-retrain"]
    assert cli(api, "schedule", "pause", rid) == 0 and api.recurring[rid]["mode"] == "DISABLE"
    assert cli(api, "schedule", "resume", rid) == 0 and api.recurring[rid]["mode"] == "ENABLE"
    assert cli(api, "schedule", "delete", rid) == 0 and api.recurring == {}
    capsys.readouterr()
    assert cli(api, "schedule", "pause", rid) == 1
    assert one_line_error(capsys) == f"kiln schedule: KFP API 404 Not Found: recurring run {rid} not found"


def test_a_five_field_cron_is_refused_before_any_call(api: FakeKfp, package: Path, capsys) -> None:
    assert cli(api, "schedule", "create", "--package", str(package), "--cron", "0 3 * * *",
               "--param", "data_repo=r") == 1
    assert "KFP wants 6 (seconds first)" in one_line_error(capsys)
    assert api.requests == []


def test_a_bad_token_is_a_one_line_401(api: FakeKfp, package: Path, capsys) -> None:
    assert cli(api, "schedule", "list", token="expired") == 1
    err = one_line_error(capsys)
    assert err.startswith("kiln schedule: KFP API 401 Unauthorized: Unauthenticated") and "--token" in err


def test_in_cluster_the_service_account_token_file_is_used(api: FakeKfp, tmp_path: Path, monkeypatch) -> None:
    token = tmp_path / "token"
    token.write_text("good-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    assert kiln(["schedule", "list", "--host", api.url]) == 0
    assert api.requests[-1]["authorization"] == "Bearer good-token"
    assert api.requests[-1]["query"]["namespace"] == "kubeflow-user-example-com"


def test_the_fake_refuses_fields_the_models_do_not_know(api: FakeKfp) -> None:
    headers = {"Authorization": "Bearer good-token"}
    experiment = httpx.post(f"{api.url}{PREFIX}/experiments", json={"display_name": "x"}, headers=headers)
    assert experiment.status_code == 200
    body = {"display_name": "r", "experiment_id": experiment.json()["experiment_id"], "runtime_config": {
        "parameters": {"a": 1}, "paramaters": {}}}
    response = httpx.post(f"{api.url}{PREFIX}/runs", json=body, headers=headers)
    assert response.status_code == 400 and "is not a V2beta1Run" in response.json()["message"]
    assert len(api.violations) == 1
    api.violations.clear()  # expected here; the fixture asserts none for kiln's own requests
    assert json.loads(response.text)["code"] == 3


def test_unreachable_host_and_missing_token_file_are_one_line_errors(api: FakeKfp, tmp_path: Path, capsys) -> None:
    assert kiln(["schedule", "list", "--host", "http://127.0.0.1:9", "--namespace", "team-a", "--token", "t"]) == 1
    assert one_line_error(capsys).startswith("kiln schedule: cannot reach the KFP API")
    assert kiln(["schedule", "list", "--host", api.url, "--token-file", str(tmp_path / "absent")]) == 1
    assert one_line_error(capsys).startswith("kiln schedule: cannot read --token-file")
    assert api.requests == []
