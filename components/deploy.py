from typing import NamedTuple

from kfp.dsl import Dataset, Input, Metrics, Model


def deploy(onnx_model: Input[Model], variants: Input[Model], metrics: Input[Metrics], cleaned: Input[Dataset],
           model_store: str, model_name: str, data_version: str) -> NamedTuple("DeployOutputs", version=str, added=bool):
    """Copy the blessed model, its shipped int8/fp16 variants and its data's statistics
    (for drift) into the model store and move its ``production`` alias; a model already
    stored (same sha256) is not added again (``added`` false)."""
    from kiln.deploy import deploy_once

    version, added = deploy_once(onnx_model.path, model_store, model_name,
                                 {"data_version": data_version, "metrics": dict(metrics.metadata), **onnx_model.metadata},
                                 reference_clean_path=cleaned.path, variants_dir=variants.path)
    return (version.version, added)


def withheld() -> str:
    """The not-blessed branch's answer to "which version was deployed": none ("")."""
    return ""
