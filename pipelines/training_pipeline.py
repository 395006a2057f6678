"""The kiln training pipeline: one factory, for every runner.

ingest -> clean -> validate -> split -> train -> export -> evaluate -> [blessed] deploy

The environment (container image, data repository, model store) is given by whoever
runs it: ``pipelines/run_local.py`` passes local paths to ``kfp.local``; the compiled
YAML (``make compile``) is uploaded to Kubeflow or submitted by ``pipelines/submit.py``
with cluster values.
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's real types.

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import make_components

PIPELINE_NAME = "kiln-training"
DEFAULT_IMAGE = "ghcr.io/kiln-ml/kiln:0.1.0"
"""The image built from ``components/Dockerfile``; override with ``--image`` when compiling."""
DEFAULT_MODEL_STORE_PVC = "kiln-model-store"
"""The PersistentVolumeClaim of ``k8s/base`` that the server reads models from."""
MODEL_STORE_MOUNT = "/mnt/models"


DVC_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
"""Keys of the DVC remote's Secret, exposed to ingest as the env vars DVC's S3 backend reads."""


def build_pipeline(image: str = DEFAULT_IMAGE, model_store_pvc: str | None = None, train_gpus: int = 0,
                   dvc_secret: str | None = None):
    """Return the pipeline function with every step running in ``image``.

    model_store_pvc: on a cluster, the PVC mounted at MODEL_STORE_MOUNT in the steps
        that use the model store (pass ``model_store=/mnt/models``); None when the runner
        uses a local folder.
    train_gpus: NVIDIA GPUs requested by the train step (0: CPU).
    dvc_secret: a Kubernetes Secret with the S3 credentials of the DVC remote, given to
        the ingest step as environment variables (None: no credentials needed).
    """
    c = make_components(image)

    @dsl.pipeline(name=PIPELINE_NAME, description="DVC data -> validated, evaluated ONNX model -> model store")
    def training_pipeline(
        data_repo: str,
        model_store: str,
        data_rev: str = "",
        model_name: str = "mnist",
        model_type: str = "cnn",
        epochs: int = 10,
        seed: int = 0,
        resize_wrong_size: bool = False,
        drift_action: str = "warn",
        min_accuracy: float = 0.95,
        min_macro_recall: float = 0.95,
        min_class_recall: float = 0.85,
        champion_tolerance: float = 0.005,
    ):
        """data_repo: git URL or path of the DVC repository holding data/; data_rev: its git
        revision ("" = workspace); model_store: the model store root the server reads;
        drift_action: "warn" or "fail" when the data drifted from the production model's;
        champion_tolerance: how much test accuracy the new model may lose
        against the production model evaluated on the same test split and still be blessed."""
        ingest = c.ingest(data_repo=data_repo, data_rev=data_rev)
        if dvc_secret:
            kubernetes.use_secret_as_env(ingest, secret_name=dvc_secret, secret_key_to_env=DVC_SECRET_KEYS)
        clean = c.clean(raw=ingest.outputs["raw"], resize_wrong_size=resize_wrong_size)
        validate = c.validate(cleaned=clean.outputs["cleaned"])
        drift = c.drift(cleaned=clean.outputs["cleaned"], model_store=model_store, model_name=model_name,
                        drift_action=drift_action)
        # nothing trains on unvalidated (or, with drift_action="fail", drifted) data
        split = c.split(cleaned=clean.outputs["cleaned"]).after(validate, drift)
        train = c.train(train_set=split.outputs["train_set"], val_set=split.outputs["val_set"],
                        model_type=model_type, epochs=epochs, seed=seed, num_gpus=train_gpus)
        if train_gpus:
            train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(train_gpus)
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
        if model_store_pvc:  # every step that reads or writes the model store
            for task in (drift, evaluate, deploy):
                kubernetes.mount_pvc(task, pvc_name=model_store_pvc, mount_path=MODEL_STORE_MOUNT)

    return training_pipeline


def compile_pipeline(output: Path, image: str = DEFAULT_IMAGE, model_store_pvc: str = DEFAULT_MODEL_STORE_PVC,
                     train_gpus: int = 0, dvc_secret: str | None = None) -> Path:
    """Compile the cluster flavour of the pipeline to ``output`` (YAML) and return the path.

    Its ``model_store`` parameter defaults to the PVC mount, so a run started from the
    Kubeflow UI only has to name ``data_repo``.
    """
    pipeline = build_pipeline(image, model_store_pvc, train_gpus, dvc_secret)
    compiler.Compiler().compile(pipeline, package_path=str(output),
                                pipeline_parameters={"model_store": MODEL_STORE_MOUNT})
    return output


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).with_suffix(".yaml"))
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--model-store-pvc", default=DEFAULT_MODEL_STORE_PVC)
    parser.add_argument("--train-gpus", type=int, default=0)
    parser.add_argument("--dvc-secret", help="Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the DVC remote")
    args = parser.parse_args()
    print(compile_pipeline(args.output, args.image, args.model_store_pvc, args.train_gpus, args.dvc_secret))
