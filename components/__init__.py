"""Kubeflow components of kiln: thin adapters, one per pipeline step.

Each module holds one plain function whose body maps artifact paths onto one call into
``kiln`` (where all logic lives). They become KFP components only in
``make_components(image)``, so the image is chosen by whoever builds the pipeline (the
local runner, the compiler, the submitter), not fixed at import.
"""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from components.deploy import deploy, withheld
from components.drift import drift
from components.evaluate import evaluate
from components.export import export
from components.ingest import ingest
from components.merge import merge
from components.report import report
from components.resolve import resolve
from components.shard import shard
from components.split import split
from components.train import train
from components.validate import validate

STEPS = (resolve, ingest, shard, merge, validate, drift, split, train, export, evaluate, deploy, withheld, report)


def make_components(image: str) -> SimpleNamespace:
    """All steps as KFP lightweight components running in ``image``.

    ``install_kfp_package=False``: the kiln image already has kfp, so a step does not
    pip-install it before running (and under ``kfp.local`` the venv has it too).
    """
    return SimpleNamespace(
        **{step.__name__: dsl.component(step, base_image=image, install_kfp_package=False) for step in STEPS}
    )
