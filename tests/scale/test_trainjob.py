"""The ``trainjob`` training backend: the TrainJob object against the Trainer API models,
and launch / wait / log streaming / failure / timeout against a loopback Kubernetes API
(see conftest.py: a real HTTP server whose fake kubelet runs the nodes as real processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubeflow_trainer_api import models
from pydantic import ValidationError

from kiln.train import TrainConfig, read_checkpoint, weights_sha256
from kiln.trainjob import JobPaths, TrainJobError, TrainJobOptions, TrainJobTimeout, build_trainjob

pytestmark = pytest.mark.slow  # training runs as fake TrainJob nodes (real processes)


def built(**options) -> tuple[TrainJobOptions, dict]:
    opts = TrainJobOptions(**{"image": "registry.example/kiln:1.0", **options})
    paths = JobPaths.under(opts.shared_dir, "kiln-train-abc")
    return opts, build_trainjob(opts, "kiln-train-abc", paths, TrainConfig(epochs=2, device="cuda")).to_dict()


def test_trainjob_round_trips_through_the_trainer_api_models() -> None:
    _, job = built(num_nodes=4, procs_per_node=8, gpus=8, cpu="16", memory="64Gi", runtime="torch-cuda",
                   namespace="team-a", shared_dir="/mnt/store", timeout_s=7200.5)
    # the models keep only the fields they know: a round trip that changes nothing means
    # every field we set is one the Trainer API has, at the place and type it has it
    assert models.TrainerV1alpha1TrainJob.from_dict(json.loads(json.dumps(job))).to_dict() == job
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "kiln-train-abc" and job["metadata"]["namespace"] == "team-a"
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-cuda"}
    assert spec["activeDeadlineSeconds"] == 7201
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8 and trainer["image"] == "registry.example/kiln:1.0"
    want = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"] == {"requests": want, "limits": want}
    root = "/mnt/store/trainjobs/kiln-train-abc"
    command = trainer["command"]
    assert command[:3] == ["torchrun", "-m", "kiln.train"]  # the pod backend's entry point
    args = dict(zip(command[3::2], command[4::2], strict=True))
    assert args["--train"] == f"{root}/train.parquet" and args["--val"] == f"{root}/val.parquet"
    assert args["--checkpoint"] == f"{root}/model.pt" and args["--result"] == f"{root}/result.json"
    assert TrainConfig.from_dict(json.loads(args["--config"])) == TrainConfig(epochs=2, device="cuda")
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    pod = rjob["template"]["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": "kiln-model-store"}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/mnt/store"}]


def test_the_models_do_validate() -> None:
    _, job = built()
    job["spec"]["trainer"]["numNodes"] = "2"  # a string where the API has an integer
    with pytest.raises(ValidationError):
        models.TrainerV1alpha1TrainJob.from_dict(job)
    _, job = built()
    del job["spec"]["runtimeRef"]["name"]
    with pytest.raises(ValidationError):
        models.TrainerV1alpha1TrainJob.from_dict(job)


def test_no_gpu_and_no_sizes_requests_no_resources() -> None:
    _, job = built()
    assert "resourcesPerNode" not in job["spec"]["trainer"]


@pytest.mark.parametrize("bad, match", [
    (dict(num_nodes=0), "num_nodes must be a positive int"),
    (dict(procs_per_node=True), "procs_per_node must be a positive int"),
    (dict(gpus=-1), "gpus must be an int >= 0"),
    (dict(shared_dir="relative"), "shared_dir must be an absolute path"),
    (dict(timeout_s=0), "timeout_s and poll_interval_s must be > 0"),
    (dict(image=""), "must not be empty"),
])
def test_bad_options_are_refused_in_one_line(bad, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        TrainJobOptions(**{"image": "kiln:1", **bad})
    assert "\n" not in str(info.value)


def calls(outcome) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in outcome.requests]


def test_launch_wait_stream_and_pick_up_the_checkpoint(trainjob_runs, tmp_path_factory) -> None:
    run = trainjob_runs["success"]
    assert run.error is None, run.error
    result = run.result
    assert result.world_size == 2 and result.epochs_run == 1
    ckpt = read_checkpoint(result.checkpoint_path)
    assert weights_sha256(ckpt["state_dict"]) == result.weights_sha256
    # what was sent: the runtime is checked, then one TrainJob is created and polled
    sent = calls(run)
    assert sent[0] == ("GET", "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/torch-distributed")
    posts = [r for r in run.requests if r.method == "POST"]
    assert len(posts) == 1 and posts[0].path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
    body = posts[0].body
    assert models.TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body
    name = body["metadata"]["name"]
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["spec"]["trainer"]["image"] == "kiln:test"
    assert ("GET", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/{name}") in sent
    lists = [r for r in run.requests if r.path == "/api/v1/namespaces/team-a/pods"]
    assert lists and all(r.query["labelSelector"] == f"jobset.sigs.k8s.io/jobset-name={name}" for r in lists)
    (log_req,) = [r for r in run.requests if r.path.endswith("/log")]
    assert log_req.path == f"/api/v1/namespaces/team-a/pods/{name}-node-0-0-x0/log"
    assert log_req.query["follow"].lower() == "true" and log_req.query["container"] == "node"
    assert not [r for r in run.requests if r.method == "DELETE"]
    # rank 0's own log lines reached the caller's log, between following and completion
    following = run.log.index(f"trainjob: following the log of pod {name}-node-0-0-x0")
    complete = run.log.index(f"trainjob: team-a/{name} complete")
    trained = [i for i, line in enumerate(run.log) if line.startswith("train: model=mlp") and "world_size=2" in line]
    assert trained and following < trained[0] < complete
    # the staged tables and checkpoint are cleaned off the shared volume
    staged = Path(body["spec"]["trainer"]["command"][4]).parent
    assert not staged.exists()


def test_a_failed_job_fails_with_its_reason_in_one_line(trainjob_runs) -> None:
    run = trainjob_runs["failure"]
    assert isinstance(run.error, TrainJobError) and not isinstance(run.error, TrainJobTimeout)
    message = str(run.error)
    assert "\n" not in message
    assert message.startswith("TrainJob team-a/kiln-train-") and message.endswith(
        "failed: JobsFailed: jobset failed: node 0 exited with code 1 (see its log)")
    # the pod's own error was streamed into the log, and the staged inputs are kept
    body = next(r.body for r in run.requests if r.method == "POST")
    staged_val = body["spec"]["trainer"]["command"][6]
    assert any(f"{staged_val}: missing columns ['pixels', 'sha256']" in line for line in run.log)
    assert Path(staged_val).is_file()  # kept for inspection


def test_a_job_that_never_finishes_times_out_and_is_deleted(trainjob_runs) -> None:
    run = trainjob_runs["timeout"]
    assert isinstance(run.error, TrainJobTimeout) and isinstance(run.error, TimeoutError)
    assert "did not finish within 1 s; deleted it" in str(run.error) and "\n" not in str(run.error)
    name = next(r.body for r in run.requests if r.method == "POST")["metadata"]["name"]
    assert calls(run)[-1] == ("DELETE", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/{name}")
    assert not [r for r in run.requests if r.path.endswith("/log")]  # pods never ran: no log to follow
    assert run.seconds < 10


def test_an_unknown_runtime_is_refused_before_anything_is_created(trainjob_runs) -> None:
    run = trainjob_runs["no_runtime"]
    assert isinstance(run.error, TrainJobError)
    assert str(run.error).startswith("ClusterTrainingRuntime 'no-such-runtime' not found")
    assert calls(run) == [("GET", "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/no-such-runtime")]


def test_the_two_node_trainjob_ends_with_the_single_process_weights(trainjob_runs, reference_state) -> None:
    """The nodes met by static rendezvous on the master address, as Trainer's torch
    plugin sets them up."""
    run = trainjob_runs["success"]
    assert run.error is None, run.error
    got = read_checkpoint(run.result.checkpoint_path)["state_dict"]
    assert list(got) == list(reference_state)
    for key, value in reference_state.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-4)


def test_a_job_that_vanished_is_a_one_line_error(fake_kube) -> None:
    from kubernetes import client

    from kiln.trainjob import TrainJobClient

    _, url = fake_kube
    with client.ApiClient(client.Configuration(host=url)) as api:
        with pytest.raises(TrainJobError, match=r"^cannot read TrainJob team-a/gone \(deleted while running\?\): 404 ") as info:
            TrainJobClient("team-a", api).get("gone")
    assert "\n" not in str(info.value)
