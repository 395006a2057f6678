"""Run settings: where each pipeline parameter's default comes from, and how a run's
parameters become the stages' typed configs.

Each stage's settings are one dataclass, defined once in its stage module
(``kiln.train.TrainConfig``, ``kiln.validate.ValidationConfig``, ``kiln.drift.DriftConfig``,
``kiln.evaluate.Thresholds``, ``kiln.clean.CleanConfig``, ``kiln.split.SplitConfig``). The
pipeline signature takes its defaults from them (:func:`default`), shows the everyday
knobs as parameters of their own (:data:`EVERYDAY`) and every other field through one
JSON object per stage (:data:`NESTED`); ``kiln run`` builds its flags from the compiled
signature, and ``kiln run`` and ``kiln submit`` check values with :func:`check_parameters`.
Stage modules are imported only when a config is needed (torch comes with ``kiln.train``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from typing import Any

CONFIGS = {
    "train": ("kiln.train", "TrainConfig"),
    "validation": ("kiln.validate", "ValidationConfig"),
    "drift": ("kiln.drift", "DriftConfig"),
    "evaluation": ("kiln.evaluate", "Thresholds"),
    "clean": ("kiln.clean", "CleanConfig"),
    "split": ("kiln.split", "SplitConfig"),
}
"""Stage -> (module, class) of its settings."""

EVERYDAY = {
    "model_type": ("train", "model"),
    "epochs": ("train", "epochs"),
    "seed": ("train", "seed"),
    "resize_wrong_size": ("clean", "resize_wrong_size"),
    "min_accuracy": ("evaluation", "min_accuracy"),
    "min_macro_recall": ("evaluation", "min_macro_recall"),
    "min_class_recall": ("evaluation", "min_class_recall"),
}
"""Pipeline parameters that are one field of a stage config: parameter -> (stage, field)."""

NESTED = {"train_config": "train", "validation_config": "validation", "drift_config": "drift",
          "split_config": "split"}
"""Pipeline parameters that carry any other fields of a stage config, as a JSON object."""

TRAIN_BACKENDS = ("pod", "trainjob")
"""``pod``: train in the step's own pod; ``trainjob``: on a Kubeflow Trainer TrainJob (``kiln.trainjob``)."""
TRAINJOB_SIZE = {"train_num_nodes": "num_nodes", "train_procs_per_node": "procs_per_node"}
"""Pipeline parameters that size a TrainJob: parameter -> ``kiln.trainjob.TrainJobOptions`` field."""

CHAMPION_TOLERANCE = 0.005
"""Test accuracy a new model may lose against production and still be blessed."""
DRIFT_ACTIONS = ("warn", "fail")
"""What the drift step does when the data drifted; the first is the default."""


class ConfigError(ValueError):
    """A run parameter has a value its stage does not accept (the message is one line)."""


def config_class(stage: str) -> type:
    """The settings dataclass of ``stage`` (a key of :data:`CONFIGS`)."""
    module, name = CONFIGS[stage]
    return getattr(importlib.import_module(module), name)


def default(parameter: str) -> Any:
    """The default of an :data:`EVERYDAY` pipeline parameter: its config field's default."""
    stage, name = EVERYDAY[parameter]
    return next(f.default for f in dataclasses.fields(config_class(stage)) if f.name == name)


def trainjob_default(parameter: str) -> int:
    """The default of a :data:`TRAINJOB_SIZE` parameter: its TrainJobOptions field's."""
    from kiln.trainjob import TrainJobOptions

    return next(f.default for f in dataclasses.fields(TrainJobOptions) if f.name == TRAINJOB_SIZE[parameter])


def build_config(stage: str, values: Mapping[str, Any]) -> Any:
    """``stage``'s config from ``values`` (field -> value, JSON types: lists become the
    tuples the fields hold); unknown fields and bad values raise :class:`ConfigError`."""
    cls = config_class(stage)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; it has {sorted(fields)}")
    typed = {k: _typed(fields[k], v) for k, v in values.items()}
    try:
        return cls(**typed)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def _typed(field: dataclasses.Field, value: Any) -> Any:
    """A JSON value as the field holds it: a list as a tuple, and a whole float (how a
    runner's Struct carries every number) as an int in an int field."""
    if isinstance(value, list):
        return tuple(value)
    if str(field.type) in ("int", "<class 'int'>") and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def stage_values(stage: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``stage``'s config set by run ``parameters`` (everyday ones and the
    stage's nested object); a nested object naming a field that has its own parameter
    raises :class:`ConfigError`, so no field has two places to be set."""
    values = {name: parameters[p] for p, (s, name) in EVERYDAY.items() if s == stage and p in parameters}
    nested_name = next((p for p, s in NESTED.items() if s == stage), None)
    nested = as_object(parameters.get(nested_name) or {}, nested_name) if nested_name else {}
    own = {name: p for p, (s, name) in EVERYDAY.items() if s == stage}
    twice = sorted(set(own) & set(nested))
    if twice:
        raise ConfigError(f"{nested_name} sets {twice}: use the parameter(s) {[own[n] for n in twice]} instead")
    return {**values, **nested}


def as_object(value: Any, name: str) -> dict[str, Any]:
    """A nested config parameter as a dict (a JSON string is parsed)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise ConfigError(f"{name} is not JSON: {e}") from e
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a JSON object, got {value!r}")
    return dict(value)


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` (one line) unless every stage accepts what ``parameters``
    (a run's pipeline parameters; absent ones keep their defaults) set."""
    for stage in CONFIGS:
        build_config(stage, stage_values(stage, parameters))
    if parameters.get("drift_action", "warn") not in DRIFT_ACTIONS:
        raise ConfigError(f"drift_action must be one of {DRIFT_ACTIONS}, got {parameters['drift_action']!r}")
    tolerance = parameters.get("champion_tolerance", CHAMPION_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 1:
        raise ConfigError(f"champion_tolerance must be a number in [0, 1], got {tolerance!r}")
    if parameters.get("train_backend", "pod") not in TRAIN_BACKENDS:
        raise ConfigError(f"train_backend must be one of {TRAIN_BACKENDS}, got {parameters['train_backend']!r}")
    for name in TRAINJOB_SIZE:
        value = parameters.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    shards = parameters.get("shards", 1)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards must be a positive int, got {shards!r}")


def plain_value(value: Any) -> Any:
    """``value`` as the type it was given in: a runner may hand nested parameters over as
    strings or floats (``"3.0"`` for the int 3); numbers, bools and JSON come back typed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def plain_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`plain_value` of every value of ``parameters``."""
    return {key: plain_value(value) for key, value in parameters.items()}
