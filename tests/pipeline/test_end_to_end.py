"""The whole pipeline, for real: DVC data -> kfp.local run -> model store -> KServe V2 server.

A temporary DVC repository holds the real 5,000 MNIST digits (one PNG truncated on
purpose); the pipeline runs through ``kfp.local`` with ``SubprocessRunner``; the deployed
model is then served on loopback and queried with tritonclient.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton

from helpers import commit_data, init_dvc_repo, mnist_subset, serve
from kiln.data import bootstrap, write_dataset
from kiln.dataset import CLEAN_COLUMNS, read_table, to_arrays
from kiln.serving.server import create_app
from kiln.store import ModelStore, sha256_file
from pipelines.run_local import executor_output, parse_args, run, summarize, task_dir

pytestmark = pytest.mark.slow
EPOCHS = "4"  # few epochs: enough to pass the default thresholds, fast on 2 CPU cores


def run_pipeline(data_repo: Path, work: Path, *extra: str) -> tuple[Path, dict, argparse.Namespace]:
    args = parse_args(["--data-repo", str(data_repo), "--model-store", str(work / "store"),
                       "--runs-dir", str(work / "runs"), "--epochs", EPOCHS, *extra], repo_root=work)
    run_root = run(args)
    return run_root, summarize(run_root), args


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    repo = init_dvc_repo(work / "repo")
    bootstrap(repo / "data")
    png = repo / "data" / "images" / "00042.png"
    png.write_bytes(png.read_bytes()[:60])  # a truncated PNG in the data
    data_version = commit_data(repo, "data")
    run_root, summary, args = run_pipeline(repo, work)
    return {"work": work, "repo": repo, "run_root": run_root, "summary": summary, "args": args,
            "data_version": data_version}


def test_pipeline_trains_evaluates_and_deploys(deployed: dict) -> None:
    summary = deployed["summary"]
    assert summary["blessed"] is True and summary["deployed_version"] == "1"
    assert summary["test_metrics"]["accuracy"] >= 0.95
    quarantine = pd.read_csv(summary["quarantine"], dtype={"id": str})
    assert quarantine.to_dict("records")[0]["id"] == "00042"
    assert quarantine["reason"].tolist() == ["corrupt_image"]
    production = ModelStore(deployed["work"] / "store").production("mnist")
    assert production.version == "1"
    assert production.meta["data_version"] == deployed["data_version"]
    assert production.meta["metrics"]["accuracy"] == summary["test_metrics"]["accuracy"]
    assert production.meta["parameters"]["epochs"] == int(EPOCHS)
    assert (production.path / "stats.parquet").is_file()  # the reference for the next run's drift check
    # the variants export shipped are stored with the version, checksummed
    report = json.loads((task_dir(deployed["run_root"], "export") / "variants" / "variants.json").read_text())
    shipped = sorted(name for name, v in report["variants"].items() if v["ships"])
    assert production.variants == shipped
    for name in shipped:
        path, sha = production.model_file(name)
        assert sha256_file(path) == sha
    assert "expect_table_row_count_to_be_between" in Path(summary["validation_report"]).read_text()


def test_served_model_agrees_with_the_evaluation(deployed: dict) -> None:
    test_set = read_table(task_dir(deployed["run_root"], "split") / "test_set", CLEAN_COLUMNS)
    predictions = pd.read_csv(task_dir(deployed["run_root"], "evaluate") / "predictions", dtype={"id": str})
    pixels, _ = to_arrays(test_set)
    expected = predictions.set_index("id").loc[test_set["id"], "predicted"].to_numpy()
    with serve(create_app(deployed["work"] / "store", "mnist")) as server:
        client = triton.InferenceServerClient(server.address)
        assert client.is_server_ready() and client.is_model_ready("mnist")
        for binary in (False, True):
            labels = []
            for batch in np.array_split(pixels, 4):
                inp = triton.InferInput("pixels", list(batch.shape), "UINT8")
                inp.set_data_from_numpy(batch, binary_data=binary)
                result = client.infer("mnist", [inp], outputs=[triton.InferRequestedOutput("label", binary_data=binary)])
                labels.append(result.as_numpy("label"))
            np.testing.assert_array_equal(np.concatenate(labels), expected)


def test_a_model_below_thresholds_is_not_deployed(deployed: dict) -> None:
    store = ModelStore(deployed["work"] / "store")
    before = store.versions("mnist")
    run_root, summary, _ = run_pipeline(deployed["repo"], deployed["work"], "--epochs", "1", "--min-accuracy", "1.0",
                                        "--drift-action", "fail")
    assert summary["blessed"] is False and summary["deployed_version"] is None
    # same data as the production model's: drift was measured against version 1 and found none
    drift = executor_output(run_root, "drift")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert drift["drift_checked"] == 1 and drift["drifted"] == 0 and drift["reference_version"] == 1
    assert store.versions("mnist") == before and store.production("mnist").version == "1"


def test_data_that_breaks_an_expectation_stops_the_run_at_validate(tmp_path: Path, capfd) -> None:
    repo = init_dvc_repo(tmp_path / "repo")
    images, labels = mnist_subset(per_class=30)  # 300 images: below the suite's row-count minimum
    write_dataset(repo / "data", images, labels)
    commit_data(repo, "too little data")
    with pytest.raises(RuntimeError):
        run_pipeline(repo, tmp_path)
    logs = capfd.readouterr()
    assert "expect_table_row_count_to_be_between" in logs.out + logs.err
    run_root = next(p for p in (tmp_path / "runs").iterdir() if p.name != ".kfp_cache")
    report = (task_dir(run_root, "validate") / "report").read_text()
    assert "expect_table_row_count_to_be_between" in report
    assert task_dir(run_root, "train") is None  # nothing trained...
    assert task_dir(run_root, "report") is None  # a run that stops before evaluate has no report
    assert ModelStore(tmp_path / "store").production("mnist") is None  # ...nothing deployed
