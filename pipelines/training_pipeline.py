"""The kiln training pipeline: one factory, for every runner.

resolve -> ingest -> clean -> validate -> split -> train -> export -> evaluate -> [blessed] deploy

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

from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import make_components
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

UNCACHED = frozenset({"resolve", "drift", "evaluate", "deploy"})
"""resolve decides what the cached steps see; the others read the changing model store."""
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
    "ingest": Resources("1", "2", "2Gi", "4Gi"),
    "clean": Resources("1", "2", "2Gi", "4Gi"),
    "validate": Resources("1", "2", "2Gi", "4Gi"),
    "drift": Resources("500m", "2", "1Gi", "2Gi"),
    "split": Resources("500m", "1", "1Gi", "2Gi"),
    "train": Resources("4", "8", "8Gi", "16Gi"),
    "export": Resources("2", "4", "4Gi", "8Gi"),
    "evaluate": Resources("1", "2", "2Gi", "4Gi"),
    "deploy": Resources("250m", "1", "1Gi", "2Gi"),
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
    for name in ("resolve", "ingest"):  # the steps that read the data repository
        if opts.dvc_secret:
            kubernetes.use_secret_as_env(tasks[name], secret_name=opts.dvc_secret, secret_key_to_env=DVC_SECRET_KEYS)
        if opts.git_secret:
            kubernetes.use_secret_as_env(tasks[name], secret_name=opts.git_secret, secret_key_to_env=GIT_SECRET_KEYS)
    if opts.model_store_pvc:  # every step that reads or writes the model store
        for name in ("drift", "evaluate", "deploy"):
            kubernetes.mount_pvc(tasks[name], pvc_name=opts.model_store_pvc, mount_path=MODEL_STORE_MOUNT)


def build_pipeline(image: str = DEFAULT_IMAGE, cluster: ClusterOptions | None = None):
    """Return the pipeline function with every step running in ``image``.

    cluster: the Kubernetes settings of a compiled pipeline; None for ``kfp.local``.
    """
    c = make_components(image)
    default_gpus = cluster.gpus if cluster else 0

    @dsl.pipeline(name=PIPELINE_NAME, description="DVC data -> validated, evaluated ONNX model -> model store")
    def training_pipeline(
        data_repo: str,
        model_store: str,
        data_rev: str = "",
        model_name: str = "mnist",
        model_type: str = "cnn",
        epochs: int = 10,
        seed: int = 0,
        train_gpus: int = default_gpus,
        resize_wrong_size: bool = False,
        drift_action: str = "warn",
        min_accuracy: float = 0.95,
        min_macro_recall: float = 0.95,
        min_class_recall: float = 0.85,
        champion_tolerance: float = 0.005,
    ):
        """Train, evaluate and (when blessed) deploy the MNIST classifier.

        Args:
            data_repo: Git URL (https, credentials from the git Secret) or path of the DVC repository holding data/.
            model_store: Model store root the server reads; on a cluster the model-store PVC mount.
            data_rev: Branch, tag or commit of data_repo; "" is the default branch (a local path: its workspace). Resolved on every run: new commits retrain, unchanged data is served from cache.
            model_name: Name of the model in the store (and on the inference server).
            model_type: Architecture, "cnn" or "mlp".
            epochs: Training epochs.
            seed: Random seed of training (same data + seed + code = same model).
            train_gpus: GPUs for the train step (DDP when > 1); only used when compiled with GPUs.
            resize_wrong_size: Resize wrong-size images instead of quarantining them.
            drift_action: "warn" or "fail" when the data drifted from the production model's.
            min_accuracy: Least test accuracy to bless the model.
            min_macro_recall: Least macro-averaged test recall to bless the model.
            min_class_recall: Least test recall of every class to bless the model.
            champion_tolerance: Test accuracy the new model may lose against production on the same split and still be blessed.
        """
        resolve = c.resolve(data_repo=data_repo, data_rev=data_rev)
        ingest = c.ingest(data_repo=data_repo, data_commit=resolve.outputs["data_commit"],
                          data_version=resolve.outputs["data_version"])
        clean = c.clean(raw=ingest.outputs["raw"], resize_wrong_size=resize_wrong_size)
        validate = c.validate(cleaned=clean.outputs["cleaned"])
        drift = c.drift(cleaned=clean.outputs["cleaned"], model_store=model_store, model_name=model_name,
                        drift_action=drift_action)
        # nothing trains on unvalidated (or, with drift_action="fail", drifted) data
        split = c.split(cleaned=clean.outputs["cleaned"]).after(validate, drift)
        train = c.train(train_set=split.outputs["train_set"], val_set=split.outputs["val_set"],
                        model_type=model_type, epochs=epochs, seed=seed, num_gpus=train_gpus)
        export = c.export(checkpoint=train.outputs["checkpoint"], train_set=split.outputs["train_set"],
                          val_set=split.outputs["val_set"], data_version=ingest.outputs["data_version"])
        evaluate = c.evaluate(onnx_model=export.outputs["onnx_model"], test_set=split.outputs["test_set"],
                              min_accuracy=min_accuracy, min_macro_recall=min_macro_recall,
                              min_class_recall=min_class_recall, model_store=model_store, model_name=model_name,
                              champion_tolerance=champion_tolerance)
        with dsl.If(evaluate.outputs["Output"] == True, name="blessed"):  # noqa: E712 (a KFP condition, not Python)
            deploy = c.deploy(onnx_model=export.outputs["onnx_model"], variants=export.outputs["variants"],
                              metrics=evaluate.outputs["metrics"],
                              cleaned=clean.outputs["cleaned"], model_store=model_store, model_name=model_name,
                              data_version=ingest.outputs["data_version"])
        tasks = {"resolve": resolve, "ingest": ingest, "clean": clean, "validate": validate, "drift": drift,
                 "split": split, "train": train, "export": export, "evaluate": evaluate, "deploy": deploy}
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
