"""The compiled pipeline: committed YAML is current, steps are wired and gated as designed."""

from __future__ import annotations

from pathlib import Path

import yaml

from helpers import REPO_ROOT


def compile_to(tmp_path: Path, image: str | None = None) -> dict:
    from pipelines.training_pipeline import DEFAULT_IMAGE, compile_pipeline

    out = compile_pipeline(tmp_path / "p.yaml", image or DEFAULT_IMAGE)
    return out.read_text()


def test_committed_yaml_is_not_stale(tmp_path: Path) -> None:
    committed = (REPO_ROOT / "pipelines" / "training_pipeline.yaml").read_text()
    assert compile_to(tmp_path) == committed, "pipelines/training_pipeline.yaml is stale: run `make compile`"


def test_deploy_runs_only_when_blessed(tmp_path: Path) -> None:
    spec = next(yaml.safe_load_all(compile_to(tmp_path)))
    root_tasks = spec["root"]["dag"]["tasks"]
    assert set(root_tasks) >= {"ingest", "clean", "validate", "drift", "split", "train", "export", "evaluate"}
    assert "deploy" not in root_tasks
    condition = next(t for t in root_tasks.values() if "triggerPolicy" in t)
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    inner = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["deploy"]
    # split waits for validate even though it only consumes clean's output
    assert {"validate", "drift"} <= set(root_tasks["split"]["dependentTasks"])


def test_image_comes_from_the_builder_and_kfp_is_not_reinstalled(tmp_path: Path) -> None:
    spec = next(yaml.safe_load_all(compile_to(tmp_path, image="registry.example/kiln:test")))
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 9
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == "registry.example/kiln:test"
        assert "pip install" not in " ".join(container["command"])
        assert "from kiln." in " ".join(container["command"])  # the body calls into kiln


def test_cluster_flavour_mounts_the_model_store_where_it_is_used(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(compile_to(tmp_path)))
    spec, platform = docs[0], docs[1]
    assert spec["root"]["inputDefinitions"]["parameters"]["model_store"]["defaultValue"] == "/mnt/models"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert sorted(executors) == ["exec-deploy", "exec-drift", "exec-evaluate"]  # the steps that touch the store
    assert all(e["pvcMount"][0]["mountPath"] == "/mnt/models" for e in executors.values())


def test_submit_params_are_typed_and_checked() -> None:
    import pytest

    from pipelines.submit import parse_params

    params = parse_params(["data_repo=https://git.example/kiln.git", "epochs=3", "min_accuracy=0.9",
                           "resize_wrong_size=true"])
    assert params == {"data_repo": "https://git.example/kiln.git", "epochs": 3, "min_accuracy": 0.9,
                      "resize_wrong_size": True}
    with pytest.raises(ValueError, match="no parameter 'epoch'"):
        parse_params(["data_repo=x", "epoch=3"])
    with pytest.raises(ValueError, match="not a valid NUMBER_INTEGER"):
        parse_params(["data_repo=x", "epochs=three"])
    with pytest.raises(ValueError, match="required parameters missing: \\['data_repo'\\]"):
        parse_params([])


def test_cluster_options_request_gpus_and_dvc_credentials(tmp_path: Path) -> None:
    from pipelines.training_pipeline import compile_pipeline

    text = compile_pipeline(tmp_path / "p.yaml", train_gpus=2, dvc_secret="kiln-dvc-s3").read_text()
    spec, platform = yaml.safe_load_all(text)
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert train["accelerator"]["resourceCount"] == "2" and train["accelerator"]["resourceType"] == "nvidia.com/gpu"
    ingest = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-ingest"]
    assert ingest["secretAsEnv"][0]["secretName"] == "kiln-dvc-s3"
    assert {e["envVar"] for e in ingest["secretAsEnv"][0]["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
