"""The compiled pipeline: committed YAML is current, steps are wired and gated as designed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # each test compiles the pipeline


def compile_to(tmp_path: Path, image: str | None = None) -> dict:
    from pipelines.training_pipeline import DEFAULT_IMAGE, compile_pipeline

    out = compile_pipeline(tmp_path / "p.yaml", image or DEFAULT_IMAGE)
    return out.read_text()


def flat_tasks(spec: dict, dag: dict | None = None) -> dict:
    """Every component task of the pipeline by name, nested condition/loop DAGs flattened."""
    tasks = {}
    for name, task in (dag or spec["root"]["dag"])["tasks"].items():
        inner = spec["components"][task["componentRef"]["name"]].get("dag")
        tasks.update(flat_tasks(spec, inner) if inner else {name: task})
    return tasks


def group_tasks(spec: dict, group: dict) -> dict:
    """The tasks directly inside a condition (or loop) group task."""
    return spec["components"][group["componentRef"]["name"]]["dag"]["tasks"]


def test_committed_yaml_is_not_stale(tmp_path: Path) -> None:
    committed = (REPO_ROOT / "pipelines" / "training_pipeline.yaml").read_text()
    assert compile_to(tmp_path) == committed, "pipelines/training_pipeline.yaml is stale: run `make compile`"


def test_deploy_runs_only_when_blessed_and_the_report_either_way(tmp_path: Path) -> None:
    spec = next(yaml.safe_load_all(compile_to(tmp_path)))
    root_tasks = spec["root"]["dag"]["tasks"]
    assert set(root_tasks) >= {"resolve", "ingest", "validate", "drift", "split", "train", "export", "evaluate",
                               "report"}
    assert "deploy" not in root_tasks and "withheld" not in root_tasks
    branches = next(t for n, t in root_tasks.items() if n.startswith("condition-branches"))
    blessed, rejected = group_tasks(spec, branches).values()
    assert blessed["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    assert rejected["triggerPolicy"]["condition"] == "!(inputs.parameter_values['pipelinechannel--evaluate-Output'] == true)"
    assert list(group_tasks(spec, blessed)) == ["deploy"] and list(group_tasks(spec, rejected)) == ["withheld"]
    # the report sits outside the condition and takes the deploy outcome from whichever branch ran
    report = root_tasks["report"]
    assert "triggerPolicy" not in report
    version = report["inputs"]["parameters"]["deployed_version"]["taskOutputParameter"]
    assert version["producerTask"] == branches["taskInfo"]["name"]
    oneof = spec["components"][branches["componentRef"]["name"]]["dag"]["outputs"]["parameters"]
    selectors = oneof[version["outputParameterKey"]]["valueFromOneof"]["parameterSelectors"]
    assert [s["outputParameterKey"] for s in selectors] == ["pipelinechannel--deploy-version",
                                                            "pipelinechannel--withheld-Output"]
    assert report["inputs"]["parameters"]["blessed"]["taskOutputParameter"] == {"outputParameterKey": "Output",
                                                                               "producerTask": "evaluate"}
    assert {"evaluate", "export", "train", "validate", "drift"} <= set(report["dependentTasks"])
    # split waits for validate even though it only consumes clean's output
    assert {"validate", "drift"} <= set(root_tasks["split"]["dependentTasks"])


def test_cleaning_fans_out_over_the_shard_plan(tmp_path: Path) -> None:
    from pipelines.training_pipeline import ClusterOptions, compile_pipeline

    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml",
                                                    cluster=ClusterOptions(shard_parallelism=5)).read_text()))
    root_tasks = spec["root"]["dag"]["tasks"]
    loop_name, loop = next((n, t) for n, t in root_tasks.items() if "parameterIterator" in t)
    assert loop["iteratorPolicy"] == {"parallelismLimit": 5}
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--ingest-Output"}
    assert loop["inputs"]["parameters"]["pipelinechannel--ingest-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "ingest"}
    assert list(group_tasks(spec, loop)) == ["shard"]
    shard = group_tasks(spec, loop)["shard"]["inputs"]
    assert shard["parameters"]["shard"] == {"componentInputParameter": "pipelinechannel--ingest-Output-loop-item"}
    assert shard["artifacts"]["plan"] == {"componentInputArtifact": "pipelinechannel--ingest-plan"}
    # merge takes every shard's part (dsl.Collected), and everything downstream reads merge
    parts = root_tasks["merge"]["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]
    assert parts["producerTask"] == loop_name
    assert root_tasks["validate"]["inputs"]["artifacts"]["cleaned"]["taskOutputArtifact"]["producerTask"] == "merge"
    assert spec["root"]["inputDefinitions"]["parameters"]["shards"]["defaultValue"] == 1


def test_train_gets_what_the_trainjob_backend_needs(tmp_path: Path) -> None:
    from kiln.trainjob import TrainJobOptions
    from pipelines.training_pipeline import ClusterOptions, compile_pipeline

    text = compile_pipeline(tmp_path / "p.yaml", "registry.example/kiln:abc",
                            ClusterOptions(namespace="team-a", trainjob_runtime="torch-gpu")).read_text()
    spec = next(yaml.safe_load_all(text))
    train = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert {k: train[k] for k in ("backend", "num_nodes", "procs_per_node", "num_gpus")} == {
        "backend": {"componentInputParameter": "train_backend"},
        "num_nodes": {"componentInputParameter": "train_num_nodes"},
        "procs_per_node": {"componentInputParameter": "train_procs_per_node"},
        "num_gpus": {"componentInputParameter": "train_gpus"}}
    options = train["trainjob"]["runtimeValue"]["constant"]
    assert options == {"image": "registry.example/kiln:abc", "namespace": "team-a", "runtime": "torch-gpu",
                       "pvc": "kiln-model-store", "shared_dir": "/mnt/models", "timeout_s": 6 * 3600}
    TrainJobOptions(**options, num_nodes=2, procs_per_node=1)  # what the step builds from it
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["train_backend"]["defaultValue"] == "pod"
    assert (params["train_num_nodes"]["defaultValue"], params["train_procs_per_node"]["defaultValue"]) == (2, 1)


def test_image_comes_from_the_builder_and_kfp_is_not_reinstalled(tmp_path: Path) -> None:
    spec = next(yaml.safe_load_all(compile_to(tmp_path, image="registry.example/kiln:test")))
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 13
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == "registry.example/kiln:test"
        assert "pip install" not in " ".join(container["command"])
        if name != "exec-withheld":  # the not-blessed branch only says "no version"
            assert "from kiln." in " ".join(container["command"])  # the body calls into kiln


def test_cluster_flavour_mounts_the_model_store_where_it_is_used(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(compile_to(tmp_path)))
    spec, platform = docs[0], docs[1]
    assert spec["root"]["inputDefinitions"]["parameters"]["model_store"]["defaultValue"] == "/mnt/models"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = sorted(name for name, e in executors.items() if "pvcMount" in e)
    # the steps that touch the store, and train: the trainjob backend shares files with its nodes there
    assert mounted == ["exec-deploy", "exec-drift", "exec-evaluate", "exec-train"]
    assert all(executors[e]["pvcMount"][0]["mountPath"] == "/mnt/models" for e in mounted)


def test_cli_params_are_typed_and_checked() -> None:
    import pytest

    from pipelines.kfp_client import KfpError, parse_params, read_spec

    spec, _ = read_spec(REPO_ROOT / "pipelines" / "training_pipeline.yaml")
    params = parse_params(["data_repo=https://git.example/kiln.git", "epochs=3", "min_accuracy=0.9",
                           "resize_wrong_size=true"], spec)
    assert params == {"data_repo": "https://git.example/kiln.git", "epochs": 3, "min_accuracy": 0.9,
                      "resize_wrong_size": True}
    with pytest.raises(KfpError, match="no parameter 'epoch'"):
        parse_params(["data_repo=x", "epoch=3"], spec)
    with pytest.raises(KfpError, match="not a valid NUMBER_INTEGER"):
        parse_params(["data_repo=x", "epochs=three"], spec)
    with pytest.raises(KfpError, match="required parameters missing: \\['data_repo'\\]"):
        parse_params([], spec)


def test_every_parameter_is_described_for_the_ui(tmp_path: Path) -> None:
    spec = next(yaml.safe_load_all(compile_to(tmp_path)))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert len(params) == 22
    undescribed = [name for name, p in params.items() if not p.get("description")]
    assert undescribed == []
    assert "default branch" in params["data_rev"]["description"]


def test_resolve_and_store_readers_are_never_cached(tmp_path: Path) -> None:
    spec = next(yaml.safe_load_all(compile_to(tmp_path)))
    tasks = flat_tasks(spec)
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"ingest", "shard", "merge", "validate", "split", "train", "export"}
    # ingest's cache key holds what resolve pinned, not the moving data_rev
    ingest = tasks["ingest"]["inputs"]["parameters"]
    assert ingest["data_commit"]["taskOutputParameter"] == {"outputParameterKey": "data_commit", "producerTask": "resolve"}
    assert ingest["data_version"]["taskOutputParameter"]["producerTask"] == "resolve"
    assert "data_rev" not in ingest


def test_cluster_options_per_task(tmp_path: Path) -> None:
    from pipelines.training_pipeline import DEFAULT_RESOURCES, ClusterOptions, compile_pipeline

    text = compile_pipeline(tmp_path / "p.yaml", cluster=ClusterOptions(gpus=2, dvc_secret="kiln-dvc-s3",
                                                                         git_secret="kiln-git")).read_text()
    spec, platform = yaml.safe_load_all(text)
    tasks = flat_tasks(spec)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, task in tasks.items():
        if "componentRef" not in task or name not in DEFAULT_RESOURCES:
            continue
        resources = spec["deploymentSpec"]["executors"][f"exec-{name}"]["container"]["resources"]
        want = DEFAULT_RESOURCES[name]
        assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"], resources["resourceMemoryRequest"],
                resources["resourceMemoryLimit"]) == (want.cpu_request, want.cpu_limit, want.memory_request,
                                                      want.memory_limit), name
        retry = task.get("retryPolicy")
        if name in ("resolve", "ingest", "deploy"):
            assert retry == {"maxRetryCount": 3, "backoffDuration": "30s", "backoffFactor": 2.0,
                             "backoffMaxDuration": "600s"}, name
        else:
            assert retry is None, name
    assert set(tasks) == set(DEFAULT_RESOURCES)

    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert train["resourceType"] == "nvidia.com/gpu"
    assert train["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--train_gpus']}}"  # a run parameter
    assert spec["root"]["inputDefinitions"]["parameters"]["train_gpus"]["defaultValue"] == 2
    assert tasks["train"]["inputs"]["parameters"]["num_gpus"] == {"componentInputParameter": "train_gpus"}
    assert k8s["exec-train"]["activeDeadlineSeconds"] == str(6 * 3600)
    assert k8s["exec-train"]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
    assert k8s["exec-train"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert k8s["exec-train"]["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                                    "sizeLimit": "2Gi"}]
    for name in ("resolve", "ingest", "shard"):  # the steps that read the data repository get both secrets
        secrets = {s["secretName"]: {e["envVar"]: e["secretKey"] for e in s["keyToEnv"]} for s in k8s[f"exec-{name}"]["secretAsEnv"]}
        assert secrets == {"kiln-dvc-s3": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                           "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
                           "kiln-git": {"KILN_GIT_USERNAME": "username", "KILN_GIT_PASSWORD": "password"}}
    assert all("secretAsEnv" not in k8s.get(f"exec-{n}", {}) for n in ("merge", "train", "deploy"))


def test_without_gpus_train_asks_for_none(tmp_path: Path) -> None:
    spec, platform = yaml.safe_load_all(compile_to(tmp_path))
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    # the timeout and the store (the trainjob backend's shared dir) only: no toleration, selector or /dev/shm
    assert set(train) == {"activeDeadlineSeconds", "pvcMount"}
