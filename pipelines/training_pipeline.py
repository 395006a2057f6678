"""The kiln training pipeline: one factory, for every runner.

resolve -> ingest (shard plan) -> ParallelFor(shard) -> merge -> validate + drift -> split -> train -> export
        -> evaluate -> [blessed] deploy | [not blessed] withheld -> report

Cleaning fans out: ingest lists the data and assigns each file to one of ``shards`` shards
by a hash of its id; each ``shard`` task fetches, checks and measures its files; ``merge``
resolves duplicates across shards (see ``kiln.shard``).

The environment (container image, data repository, model store) is given by whoever
runs it: ``pipelines/run_local.py`` passes local paths to ``kfp.local``; ``kiln compile``
writes the cluster flavour (``ClusterOptions``) that ``kiln upload`` / ``kiln submit``
send to Kubeflow.

Caching decides what a run redoes. ``resolve`` (cheap) runs every time and pins the data
revision to a commit and data version; ``ingest`` and everything after it are cached on
those values and on the image string, whose tag carries the kiln code version. Steps that
read the model store (drift, evaluate, deploy) are never cached: the store changes
between runs.
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's real types.

import json
from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import make_components
from kiln.config import CHAMPION_TOLERANCE, DRIFT_ACTIONS, TRAIN_BACKENDS, default, trainjob_default
from kiln.images import image_ref

PIPELINE_NAME = "kiln-training"
DEFAULT_IMAGE = image_ref("steps")
"""The steps image named in ``images.toml`` (``make images`` builds it); tag it with the
kiln commit and pass ``--image`` when compiling, so a code change changes every step's cache key."""
DEFAULT_MODEL_STORE_PVC = "kiln-model-store"
"""The PersistentVolumeClaim of ``k8s/base`` that the server reads models from."""
MODEL_STORE_MOUNT = "/mnt/models"

DVC_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
"""Keys of the DVC remote's Secret, exposed as the env vars DVC's S3 backend reads."""
GIT_SECRET_KEYS = {"username": "KILN_GIT_USERNAME", "password": "KILN_GIT_PASSWORD"}
"""Keys of a ``kubernetes.io/basic-auth`` Secret for a private https ``data_repo`` (see kiln.ingest)."""

LOCAL_SHARD_PARALLELISM = 2
"""Shard tasks ``kfp.local`` runs at once (its threads share this machine's cores)."""
UNCACHED = frozenset({"resolve", "drift", "evaluate", "deploy", "withheld", "report"})
"""resolve decides what the cached steps see; drift, evaluate and deploy read the changing model
store, and what the report and the deploy outcome show follows from them."""
RETRIED = frozenset({"resolve", "ingest", "deploy"})
"""Steps that talk to git, the DVC remote or the shared store: transient failures are worth a retry."""


@dataclass(frozen=True)
class Resources:
    """CPU/memory requests and limits of one step (Kubernetes quantities)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


DEFAULT_RESOURCES = {
    "resolve": Resources("250m", "1", "512Mi", "1Gi"),
    "ingest": Resources("500m", "1", "1Gi", "2Gi"),
    "shard": Resources("1", "2", "2Gi", "4Gi"),
    "merge": Resources("1", "2", "2Gi", "4Gi"),
    "validate": Resources("1", "2", "2Gi", "4Gi"),
    "drift": Resources("500m", "2", "1Gi", "2Gi"),
    "split": Resources("500m", "1", "1Gi", "2Gi"),
    "train": Resources("4", "8", "8Gi", "16Gi"),
    "export": Resources("2", "4", "4Gi", "8Gi"),
    "evaluate": Resources("1", "2", "2Gi", "4Gi"),
    "deploy": Resources("250m", "1", "1Gi", "2Gi"),
    "withheld": Resources("100m", "500m", "256Mi", "512Mi"),
    "report": Resources("500m", "1", "1Gi", "2Gi"),
}


@dataclass(frozen=True)
class ClusterOptions:
    """What ``kiln compile`` sets for a cluster; ``None`` (the local runner) sets none of it."""

    model_store_pvc: str | None = DEFAULT_MODEL_STORE_PVC
    dvc_secret: str | None = None
    git_secret: str | None = None
    gpus: int = 0
    """Default of the ``train_gpus`` run parameter; > 0 puts train on a GPU node."""
    gpu_type: str = "nvidia.com/gpu"
    gpu_node_selector: tuple[str, str] = ("nvidia.com/gpu.present", "true")
    gpu_toleration_key: str = "nvidia.com/gpu"
    shm_size: str = "2Gi"
    """Memory-backed /dev/shm of train: DataLoader workers and NCCL share tensors through it."""
    resources: dict[str, Resources] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    retries: int = 3
    retry_backoff: str = "30s"
    retry_backoff_max: str = "600s"
    train_timeout_s: int = 6 * 3600
    namespace: str = "kubeflow-user-example-com"
    """Where the pipeline runs; the trainjob backend creates its TrainJob here (``k8s/rbac`` grants it)."""
    trainjob_runtime: str = "torch-distributed"
    """The Kubeflow Trainer (Cluster)TrainingRuntime of the trainjob backend."""
    shard_parallelism: int = 16
    """Shard tasks running at once (the ``parallelism`` of the clean fan-out), fixed at compile time."""


def _trainjob_options(image: str, cluster: ClusterOptions | None) -> dict:
    """What the trainjob backend needs from the build: the image its nodes run, and where
    the shared model-store volume is (mounted in the train pod too); {} for kfp.local."""
    if cluster is None or not cluster.model_store_pvc:
        return {}
    return {"image": image, "namespace": cluster.namespace, "runtime": cluster.trainjob_runtime,
            "pvc": cluster.model_store_pvc, "shared_dir": MODEL_STORE_MOUNT, "timeout_s": cluster.train_timeout_s}


def _configure_cluster(tasks: dict, opts: ClusterOptions, train_gpus) -> None:
    """Resources, retries, timeout, GPUs, secrets and the model-store PVC, per task."""
    for name, task in tasks.items():
        res = opts.resources[name]
        task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
        task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
        if name in RETRIED:
            task.set_retry(opts.retries, backoff_duration=opts.retry_backoff, backoff_factor=2.0,
                           backoff_max_duration=opts.retry_backoff_max)
    train = tasks["train"]
    kubernetes.set_timeout(train, opts.train_timeout_s)
    if opts.gpus:
        train.set_accelerator_type(opts.gpu_type).set_accelerator_limit(train_gpus)
        kubernetes.add_node_selector(train, *opts.gpu_node_selector)
        kubernetes.add_toleration(train, key=opts.gpu_toleration_key, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=opts.shm_size)
    for name in ("resolve", "ingest", "shard"):  # the steps that read the data repository
        if opts.dvc_secret:
            kubernetes.use_secret_as_env(tasks[name], secret_name=opts.dvc_secret, secret_key_to_env=DVC_SECRET_KEYS)
        if opts.git_secret:
            kubernetes.use_secret_as_env(tasks[name], secret_name=opts.git_secret, secret_key_to_env=GIT_SECRET_KEYS)
    if opts.model_store_pvc:  # every step that reads or writes the model store
        for name in ("drift", "evaluate", "deploy", "train"):  # train: the trainjob backend's shared dir
            kubernetes.mount_pvc(tasks[name], pvc_name=opts.model_store_pvc, mount_path=MODEL_STORE_MOUNT)


def build_pipeline(image: str = DEFAULT_IMAGE, cluster: ClusterOptions | None = None):
    """Return the pipeline function with every step running in ``image``.

    cluster: the Kubernetes settings of a compiled pipeline; None for ``kfp.local``.
    """
    c = make_components(image)
    default_gpus = cluster.gpus if cluster else 0
    parallelism = cluster.shard_parallelism if cluster else LOCAL_SHARD_PARALLELISM

    @dsl.pipeline(name=PIPELINE_NAME, description="DVC data -> validated, evaluated ONNX model -> model store")
    def training_pipeline(
        data_repo: str,
        model_store: str,
        data_rev: str = "",
        model_name: str = "mnist",
        model_type: str = default("model_type"),
        epochs: int = default("epochs"),
        seed: int = default("seed"),
        train_gpus: int = default_gpus,
        train_backend: str = TRAIN_BACKENDS[0],
        train_num_nodes: int = trainjob_default("train_num_nodes"),
        train_procs_per_node: int = trainjob_default("train_procs_per_node"),
        resize_wrong_size: bool = default("resize_wrong_size"),
        shards: int = 1,
        drift_action: str = DRIFT_ACTIONS[0],
        min_accuracy: float = default("min_accuracy"),
        min_macro_recall: float = default("min_macro_recall"),
        min_class_recall: float = default("min_class_recall"),
        champion_tolerance: float = CHAMPION_TOLERANCE,
        train_config: dict = {},  # noqa: B006 (a KFP parameter default, never mutated)
        validation_config: dict = {},  # noqa: B006
        drift_config: dict = {},  # noqa: B006
        split_config: dict = {},  # noqa: B006
    ):
        """Train, evaluate and (when blessed) deploy the MNIST classifier.

        Args:
            data_repo: Git URL (https, credentials from the git Secret) or path of the DVC repository holding data/.
            model_store: Model store root the server reads; on a cluster the model-store PVC mount.
            data_rev: Branch, tag or commit of data_repo; "" is the default branch (a local path: its workspace). Resolved on every run: new commits retrain, unchanged data is served from cache.
            model_name: Name of the model in the store (and on the inference server).
            model_type: Network family of kiln.models: "cnn", "mlp", "gru" or "transformer".
            epochs: Training epochs.
            seed: Random seed of training (same data + seed + code = same model).
            train_gpus: GPUs for the train step (DDP when > 1); only used when compiled with GPUs. With the trainjob backend: GPUs per TrainJob node.
            train_backend: "pod" trains in the train step's pod; "trainjob" on a Kubeflow Trainer TrainJob (multi-node DDP; needs the cluster build and Kubeflow Trainer).
            train_num_nodes: Nodes of the TrainJob (train_backend "trainjob").
            train_procs_per_node: Training processes per TrainJob node (train_backend "trainjob").
            resize_wrong_size: Resize wrong-size images instead of quarantining them.
            shards: Shards cleaning and per-image statistics fan out over (one task each, at most the compiled parallelism at once); results are the same for any number.
            drift_action: "warn" or "fail" when the data drifted from the production model's.
            min_accuracy: Least test accuracy to bless the model.
            min_macro_recall: Least macro-averaged test recall to bless the model.
            min_class_recall: Least test recall of every class to bless the model.
            champion_tolerance: Test accuracy the new model may lose against production on the same split and still be blessed.
            train_config: Any other kiln.train.TrainConfig field as JSON, e.g. {"lr": 0.001, "batch_size": 128, "patience": 5}; model, epochs and seed are the parameters above.
            validation_config: kiln.validate.ValidationConfig fields to change, as JSON, e.g. {"min_rows": 500}.
            drift_config: kiln.drift.DriftConfig fields to change, as JSON, e.g. {"psi_fail": 0.3}.
            split_config: kiln.split.SplitConfig fields to change, as JSON, e.g. {"val_fraction": 0.15}.
        """
        resolve = c.resolve(data_repo=data_repo, data_rev=data_rev)
        data_version = resolve.outputs["data_version"]  # ingest fails the run unless it reads exactly this
        ingest = c.ingest(data_repo=data_repo, data_commit=resolve.outputs["data_commit"], data_version=data_version,
                          shards=shards)
        with dsl.ParallelFor(ingest.outputs["Output"], parallelism=parallelism, name="shards") as shard_no:
            shard = c.shard(plan=ingest.outputs["plan"], shard=shard_no, data_repo=data_repo,
                            resize_wrong_size=resize_wrong_size)
        merge = c.merge(parts=dsl.Collected(shard.outputs["part"]), data_version=data_version)
        validate = c.validate(cleaned=merge.outputs["cleaned"], validation_config=validation_config)
        drift = c.drift(cleaned=merge.outputs["cleaned"], model_store=model_store, model_name=model_name,
                        drift_action=drift_action, drift_config=drift_config)
        # nothing trains on unvalidated (or, with drift_action="fail", drifted) data
        split = c.split(cleaned=merge.outputs["cleaned"], split_config=split_config).after(validate, drift)
        train = c.train(train_set=split.outputs["train_set"], val_set=split.outputs["val_set"],
                        model_type=model_type, epochs=epochs, seed=seed, train_config=train_config,
                        num_gpus=train_gpus, backend=train_backend, num_nodes=train_num_nodes,
                        procs_per_node=train_procs_per_node, trainjob=_trainjob_options(image, cluster))
        export = c.export(checkpoint=train.outputs["checkpoint"], train_set=split.outputs["train_set"],
                          val_set=split.outputs["val_set"], data_version=data_version)
        evaluate = c.evaluate(onnx_model=export.outputs["onnx_model"], test_set=split.outputs["test_set"],
                              min_accuracy=min_accuracy, min_macro_recall=min_macro_recall,
                              min_class_recall=min_class_recall, model_store=model_store, model_name=model_name,
                              champion_tolerance=champion_tolerance)
        with dsl.If(evaluate.outputs["Output"] == True, name="blessed"):  # noqa: E712 (a KFP condition, not Python)
            deploy = c.deploy(onnx_model=export.outputs["onnx_model"], variants=export.outputs["variants"],
                              metrics=evaluate.outputs["metrics"],
                              cleaned=merge.outputs["cleaned"], model_store=model_store, model_name=model_name,
                              data_version=data_version)
        with dsl.Else(name="not-blessed"):
            withheld = c.withheld()
        # outside the condition, so it runs either way; OneOf carries whichever branch ran
        report = c.report(
            raw=merge.outputs["quarantined_raw"], cleaned=merge.outputs["cleaned"], quarantine=merge.outputs["quarantine"],
            repairs=merge.outputs["repairs"], validation=validate.outputs["metrics"], drift=drift.outputs["metrics"],
            curves=train.outputs["curves"], onnx_model=export.outputs["onnx_model"],
            variants=export.outputs["variants"], metrics=evaluate.outputs["metrics"],
            predictions=evaluate.outputs["predictions"], verdict=evaluate.outputs["verdict"],
            blessed=evaluate.outputs["Output"],
            deployed_version=dsl.OneOf(deploy.outputs["version"], withheld.output),
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, data_repo=data_repo, data_rev=data_rev,
            data_commit=resolve.outputs["data_commit"], data_version=data_version,
            model_store=model_store, model_name=model_name,
            parameters={"model_type": model_type, "epochs": epochs, "seed": seed, "train_gpus": train_gpus,
                        "train_backend": train_backend, "train_num_nodes": train_num_nodes,
                        "train_procs_per_node": train_procs_per_node,
                        "resize_wrong_size": resize_wrong_size, "shards": shards, "drift_action": drift_action,
                        "min_accuracy": min_accuracy, "min_macro_recall": min_macro_recall,
                        "min_class_recall": min_class_recall, "champion_tolerance": champion_tolerance,
                        "train_config": train_config, "validation_config": validation_config,
                        "drift_config": drift_config, "split_config": split_config})
        tasks = {"resolve": resolve, "ingest": ingest, "shard": shard, "merge": merge, "validate": validate, "drift": drift,
                 "split": split, "train": train, "export": export, "evaluate": evaluate, "deploy": deploy,
                 "withheld": withheld, "report": report}
        for name, task in tasks.items():
            task.set_caching_options(enable_caching=name not in UNCACHED)
        if cluster is not None:
            _configure_cluster(tasks, cluster, train_gpus)

    return training_pipeline


def compile_pipeline(output: Path, image: str = DEFAULT_IMAGE, cluster: ClusterOptions | None = None) -> Path:
    """Compile the cluster flavour of the pipeline to ``output`` (YAML) and return the path.

    Its ``model_store`` parameter defaults to the PVC mount, so a run started from the
    Kubeflow UI only has to name ``data_repo``.
    """
    pipeline = build_pipeline(image, cluster or ClusterOptions())
    compiler.Compiler().compile(pipeline, package_path=str(output),
                                pipeline_parameters={"model_store": MODEL_STORE_MOUNT})
    return output


def parameters_markdown() -> str:
    """The run parameters as README's Markdown table: name, type, default (the stage
    config field it comes from), description; README's table is tested against this."""
    from kiln.config import CONFIGS, EVERYDAY, NESTED

    rows = ["| parameter | type | default | what it is |", "| --- | --- | --- | --- |"]
    for name, spec in build_pipeline().component_spec.inputs.items():
        default = "(required)" if spec.default is None and not spec.optional else f"`{json.dumps(spec.default)}`"
        if name in EVERYDAY:
            stage, field_name = EVERYDAY[name]
            default += f" (`{CONFIGS[stage][1]}.{field_name}`)"
        elif name in NESTED:
            default += f" (`{CONFIGS[NESTED[name]][1]}` fields)"
        rows.append(f"| `{name}` | {spec.type.lower()} | {default} | {spec.description or ''} |")
    return "\n".join(rows) + "\n"
