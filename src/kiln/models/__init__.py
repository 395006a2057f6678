"""Network families, one module each, behind a registry keyed by ``model_type``.

A family module defines its ``nn.Module`` (normalised float [N, 1, 28, 28] in, logits
[N, 10] out) and ``build(config) -> nn.Module``, where ``config`` is the training
config as a mapping (:meth:`kiln.train.TrainConfig.to_dict`, or the dict saved in a
checkpoint); a family reads only the fields it needs. Adding a family is a new module
and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from kiln.models import cnn, mlp
from kiln.models.base import MNIST_MEAN, MNIST_STD, Preprocess, ServingModel, predict_proba
from kiln.models.cnn import ConvNet
from kiln.models.mlp import MLP

FAMILIES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {"cnn": cnn.build, "mlp": mlp.build}
"""``model_type`` -> the family's ``build(config)``."""

MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def build_model(config: Mapping[str, Any] | Any) -> nn.Module:
    """A freshly initialised network of family ``config["model"]``.

    ``config`` is a mapping of training-config fields or an object with ``to_dict()``
    (a ``TrainConfig``). Initialisation draws from torch's global RNG, so seed it first
    for a reproducible start. Raises ValueError for an unknown family.
    """
    fields = config.to_dict() if hasattr(config, "to_dict") else config
    model_type = fields.get("model")
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model {model_type!r}; known families are {list(MODEL_TYPES)}")
    return FAMILIES[model_type](fields)


__all__ = [
    "FAMILIES",
    "MLP",
    "MNIST_MEAN",
    "MNIST_STD",
    "MODEL_TYPES",
    "ConvNet",
    "Preprocess",
    "ServingModel",
    "build_model",
    "predict_proba",
]
