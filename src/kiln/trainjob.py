"""Multi-node training through Kubeflow Trainer v2: the train step's ``trainjob`` backend.

:func:`run_trainjob` stages the clean train/validation tables on the shared model-store
volume (a ReadWriteMany PVC the calling pod mounts too), creates a ``TrainJob``
(``trainer.kubeflow.org/v1alpha1``) that runs the same entry point as the ``pod``
backend (``torchrun -m kiln.train ...``) on ``num_nodes`` x ``procs_per_node`` workers,
follows it to ``Complete`` or ``Failed`` while streaming rank 0's log into the caller's
log, and copies the checkpoint rank 0 wrote on the volume to the step's output.

The object is built from the ``kubeflow-trainer-api`` models and sent with the
Kubernetes client: every call the step makes is listed in :data:`API_CALLS` and granted by
``k8s/rbac``. The runtime's torch plugin sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK`` and the master address for each node; ``torchrun`` reads them, so the
command names no topology itself.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeflow_trainer_api import models

from kiln.train import TrainConfig, TrainResult

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
TRAINJOBS = "trainjobs"
CLUSTER_RUNTIMES = "clustertrainingruntimes"
NODE = "node"
"""Replicated job and container name of the training nodes in the torch runtimes."""
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
RJOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
VOLUME = "kiln-shared"
PATCH_MANAGER = "kiln.dev/trainjob"

API_CALLS = (
    # (API group, resource, verb): what run_trainjob does against the cluster.
    (GROUP, CLUSTER_RUNTIMES, "get"),
    (GROUP, TRAINJOBS, "create"),
    (GROUP, TRAINJOBS, "get"),
    (GROUP, TRAINJOBS, "delete"),
    ("", "pods", "list"),
    ("", "pods/log", "get"),
)


class TrainJobError(RuntimeError):
    """The TrainJob could not be created, failed, or left no checkpoint (one-line message)."""


class TrainJobTimeout(TrainJobError, TimeoutError):
    """The TrainJob did not finish within ``timeout_s``; it has been deleted."""


@dataclass(frozen=True)
class TrainJobOptions:
    """Where and how big the TrainJob is. ``shared_dir`` is where the ReadWriteMany PVC
    ``pvc`` is mounted, in the calling pod and in every training node alike."""

    image: str
    num_nodes: int = 2
    procs_per_node: int = 1
    runtime: str = "torch-distributed"
    namespace: str = "kubeflow-user-example-com"
    pvc: str = "kiln-model-store"
    shared_dir: str = "/mnt/models"
    cpu: str | None = None
    memory: str | None = None
    gpus: int = 0
    timeout_s: float = 3600.0
    poll_interval_s: float = 5.0
    name_prefix: str = "kiln-train"

    def __post_init__(self) -> None:
        for field in ("num_nodes", "procs_per_node"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ValueError(f"gpus must be an int >= 0, got {self.gpus!r}")
        if not self.image or not self.runtime or not self.namespace or not self.pvc:
            raise ValueError("image, runtime, namespace and pvc must not be empty")
        if not Path(self.shared_dir).is_absolute():
            raise ValueError(f"shared_dir must be an absolute path, got {self.shared_dir!r}")
        if not self.timeout_s > 0 or not self.poll_interval_s > 0:
            raise ValueError(f"timeout_s and poll_interval_s must be > 0, got {self.timeout_s}, {self.poll_interval_s}")


@dataclass(frozen=True)
class JobPaths:
    """The job's files on the shared volume (the same path in the caller and the nodes)."""

    root: Path

    @classmethod
    def under(cls, shared_dir: str | Path, name: str) -> JobPaths:
        return cls(Path(shared_dir) / "trainjobs" / name)

    @property
    def train(self) -> Path:
        return self.root / "train.parquet"

    @property
    def val(self) -> Path:
        return self.root / "val.parquet"

    @property
    def checkpoint(self) -> Path:
        return self.root / "model.pt"

    @property
    def result(self) -> Path:
        return self.root / "result.json"


def new_job_name(prefix: str = "kiln-train") -> str:
    """A unique DNS-1035 name: the prefix and 8 random hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def trainer_command(paths: JobPaths, config: TrainConfig) -> list[str]:
    """What each node runs: the ``pod`` backend's entry point under torchrun."""
    return [
        "torchrun", "-m", "kiln.train", "--train", str(paths.train), "--val", str(paths.val),
        "--checkpoint", str(paths.checkpoint), "--config", json.dumps(config.to_dict(), sort_keys=True),
        "--result", str(paths.result),
    ]


def _resources(options: TrainJobOptions) -> models.IoK8sApiCoreV1ResourceRequirements | None:
    amounts: dict[str, Any] = {k: v for k, v in (("cpu", options.cpu), ("memory", options.memory)) if v}
    if options.gpus:
        amounts["nvidia.com/gpu"] = str(options.gpus)
    if not amounts:
        return None
    return models.IoK8sApiCoreV1ResourceRequirements.from_dict({"requests": amounts, "limits": amounts})


def _volume_patch(options: TrainJobOptions) -> models.TrainerV1alpha1RuntimePatch:
    """Mount the shared PVC at ``shared_dir`` in every training node."""
    pod_spec = models.TrainerV1alpha1PodSpecPatch(
        volumes=[models.IoK8sApiCoreV1Volume(
            name=VOLUME,
            persistentVolumeClaim=models.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claimName=options.pvc),
        )],
        containers=[models.TrainerV1alpha1ContainerPatch(
            name=NODE,
            volumeMounts=[models.IoK8sApiCoreV1VolumeMount(name=VOLUME, mountPath=options.shared_dir)],
        )],
    )
    job = models.TrainerV1alpha1ReplicatedJobPatch(
        name=NODE,
        template=models.TrainerV1alpha1JobTemplatePatch(spec=models.TrainerV1alpha1JobSpecPatch(
            template=models.TrainerV1alpha1PodTemplatePatch(spec=pod_spec))),
    )
    return models.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        trainingRuntimeSpec=models.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=models.TrainerV1alpha1JobSetTemplatePatch(
                spec=models.TrainerV1alpha1JobSetSpecPatch(replicatedJobs=[job]))),
    )


def build_trainjob(options: TrainJobOptions, name: str, paths: JobPaths, config: TrainConfig) -> models.TrainerV1alpha1TrainJob:
    """The TrainJob that trains ``config`` on ``paths``' tables on the options' nodes."""
    trainer = models.TrainerV1alpha1Trainer(
        image=options.image,
        command=trainer_command(paths, config),
        numNodes=options.num_nodes,
        numProcPerNode=options.procs_per_node,
        resourcesPerNode=_resources(options),
        # unbuffered, so the log streams while the job runs rather than when it ends
        env=[models.IoK8sApiCoreV1EnvVar(name="PYTHONUNBUFFERED", value="1")],
    )
    return models.TrainerV1alpha1TrainJob(
        apiVersion=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=options.namespace, labels={"app.kubernetes.io/part-of": "kiln"}),
        spec=models.TrainerV1alpha1TrainJobSpec(
            runtimeRef=models.TrainerV1alpha1RuntimeRef(apiGroup=GROUP, kind="ClusterTrainingRuntime", name=options.runtime),
            trainer=trainer,
            runtimePatches=[_volume_patch(options)],
            # the cluster stops it too, should the waiting step itself be lost
            activeDeadlineSeconds=max(1, math.ceil(options.timeout_s)),
        ),
    )


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class TrainJobClient:
    """The few Kubernetes calls of the ``trainjob`` backend (see :data:`API_CALLS`)."""

    def __init__(self, namespace: str, api_client: Any = None) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._api_exception = client.ApiException

    def check_runtime(self, name: str) -> None:
        try:
            self.custom.get_cluster_custom_object(GROUP, VERSION, CLUSTER_RUNTIMES, name)
        except self._api_exception as e:
            if e.status == 404:
                raise TrainJobError(f"ClusterTrainingRuntime {name!r} not found: install Kubeflow Trainer's runtimes "
                                    "or pass another runtime") from None
            raise TrainJobError(f"cannot read ClusterTrainingRuntime {name!r}: {e.status} {_one_line(e.reason)}") from None

    def create(self, job: models.TrainerV1alpha1TrainJob) -> None:
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINJOBS, job.to_dict())
        except self._api_exception as e:
            raise TrainJobError(f"cannot create TrainJob {self.namespace}/{job.metadata.name}: "
                                f"{e.status} {_one_line(e.body or e.reason)}") from None

    def get(self, name: str) -> models.TrainerV1alpha1TrainJob:
        try:
            raw = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINJOBS, name)
        except self._api_exception as e:
            gone = " (deleted while running?)" if e.status == 404 else ""
            raise TrainJobError(f"cannot read TrainJob {self.namespace}/{name}{gone}: {e.status} {_one_line(e.reason)}") from None
        return models.TrainerV1alpha1TrainJob.from_dict(raw)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINJOBS, name)

    def rank0_pod(self, name: str) -> tuple[str, str] | None:
        """(name, phase) of the job's first node pod, once it exists."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_LABEL}={name}").items
        for pod in pods:
            labels = pod.metadata.labels or {}
            if labels.get(RJOB_LABEL) == NODE and labels.get(JOB_INDEX_LABEL, "0") == "0":
                return pod.metadata.name, (pod.status.phase if pod.status else None) or "Pending"
        return None

    def follow_log(self, pod: str) -> Iterator[str]:
        """The node container's log lines as they are written, until it exits."""
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=NODE, follow=True, _preload_content=False)
        pending = b""
        try:
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            response.release_conn()


def job_outcome(job: models.TrainerV1alpha1TrainJob) -> tuple[str, str] | None:
    """("Complete" | "Failed", "reason: message") once the job has finished, else None."""
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type, _one_line(f"{condition.reason}: {condition.message}")
    return None


def _start_log_stream(client: TrainJobClient, pod: str, log: Callable[[str], None]) -> threading.Thread:
    def pump() -> None:
        try:
            for line in client.follow_log(pod):
                log(line)
        except Exception as e:  # a broken log stream must not fail the training it reports on
            log(f"trainjob: log stream of pod {pod} ended: {_one_line(e)}")

    thread = threading.Thread(target=pump, name=f"log-{pod}", daemon=True)
    thread.start()
    return thread


def wait_for_trainjob(client: TrainJobClient, name: str, timeout_s: float, poll_interval_s: float,
                      log: Callable[[str], None] = print) -> None:
    """Poll the TrainJob until it completes, streaming rank 0's log meanwhile.

    Raises TrainJobError with the job's reason when it fails, TrainJobTimeout (after
    deleting the job) when it has not finished within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    stream: threading.Thread | None = None
    while True:
        outcome = job_outcome(client.get(name))
        if stream is None:
            pod = client.rank0_pod(name)
            if pod is not None and pod[1] != "Pending":
                log(f"trainjob: following the log of pod {pod[0]}")
                stream = _start_log_stream(client, pod[0], log)
        if outcome is not None:
            break
        if time.monotonic() >= deadline:
            client.delete(name)
            raise TrainJobTimeout(f"TrainJob {client.namespace}/{name} did not finish within {timeout_s:g} s; deleted it")
        time.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))
    if stream is not None:
        stream.join(timeout=max(poll_interval_s, 5.0))  # the last lines, after the container exited
    kind, detail = outcome
    if kind == "Failed":
        raise TrainJobError(f"TrainJob {client.namespace}/{name} failed: {detail}")
    log(f"trainjob: {client.namespace}/{name} complete")


def run_trainjob(
    options: TrainJobOptions,
    train_path: str | Path,
    val_path: str | Path,
    checkpoint_path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    api_client: Any = None,
) -> TrainResult:
    """Train on a Kubeflow Trainer TrainJob and return rank 0's TrainResult, with the
    checkpoint copied to ``checkpoint_path``.

    ``overrides`` are TrainConfig fields as for :func:`kiln.train.run_train` (checked
    here, before anything is created). ``api_client`` is a ``kubernetes.client.ApiClient``
    (default: the in-cluster service account, else the kube config). The staged files are
    removed after success and kept for inspection after a failure.
    """
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **(overrides or {})})
    client = TrainJobClient(options.namespace, api_client)
    client.check_runtime(options.runtime)
    name = new_job_name(options.name_prefix)
    paths = JobPaths.under(options.shared_dir, name)
    paths.root.mkdir(parents=True)
    shutil.copyfile(train_path, paths.train)
    shutil.copyfile(val_path, paths.val)
    client.create(build_trainjob(options, name, paths, config))
    log(f"trainjob: created {options.namespace}/{name} ({options.num_nodes} x {options.procs_per_node} "
        f"workers, runtime {options.runtime})")
    wait_for_trainjob(client, name, options.timeout_s, options.poll_interval_s, log)
    if not paths.result.is_file() or not paths.checkpoint.is_file():
        raise TrainJobError(f"TrainJob {options.namespace}/{name} completed but left no checkpoint in {paths.root}")
    data = json.loads(paths.result.read_text())
    data.pop("rank", None)
    Path(checkpoint_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths.checkpoint, checkpoint_path)
    shutil.rmtree(paths.root)
    data["checkpoint_path"] = Path(checkpoint_path)
    return TrainResult(**data)
