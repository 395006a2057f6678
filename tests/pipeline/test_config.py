"""One source of truth for run settings: the stage configs' defaults are the pipeline's,
the compiled YAML's, `kiln run`'s and README's; every training hyperparameter reaches the
train step; bad values are refused before a run starts."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kfp import dsl

from helpers import REPO_ROOT, clean_frame, mnist_subset
from kiln.config import (CHAMPION_TOLERANCE, EVERYDAY, NESTED, TRAINJOB_SIZE, ConfigError, build_config,
                         check_parameters, config_class, stage_values, trainjob_default)


@pytest.fixture(scope="module")
def spec_inputs() -> dict:
    from pipelines.training_pipeline import build_pipeline

    return build_pipeline().component_spec.inputs


def test_every_place_agrees_on_every_default(spec_inputs: dict, tmp_path: Path) -> None:
    from kiln.evaluate import DEFAULT_CHAMPION_TOLERANCE, run_evaluate
    from pipelines.run_local import parse_args, pipeline_arguments

    # the pipeline signature's defaults are the stage configs'
    for name, (stage, field_name) in EVERYDAY.items():
        assert spec_inputs[name].default == getattr(config_class(stage)(), field_name), name
    assert spec_inputs["champion_tolerance"].default == CHAMPION_TOLERANCE == DEFAULT_CHAMPION_TOLERANCE
    assert inspect.signature(run_evaluate).parameters["tolerance"].default == CHAMPION_TOLERANCE
    assert all(spec_inputs[name].default == {} for name in NESTED)
    assert all(spec_inputs[name].default == trainjob_default(name) for name in TRAINJOB_SIZE)
    # the committed YAML was compiled from that signature
    committed = next(yaml.safe_load_all((REPO_ROOT / "pipelines" / "training_pipeline.yaml").read_text()))
    for name, param in committed["root"]["inputDefinitions"]["parameters"].items():
        if name != "model_store":  # the cluster flavour points it at the PVC mount
            assert param.get("defaultValue") == spec_inputs[name].default, name
    # `kiln run` flags: one per parameter, same defaults (data repo and store: this checkout)
    flags = pipeline_arguments(parse_args([], tmp_path))
    assert set(flags) == set(spec_inputs)
    for name, value in flags.items():
        if name not in ("data_repo", "model_store"):
            assert value == spec_inputs[name].default, name
    # no component carries a default of its own: every value comes from the pipeline
    from components import STEPS

    for step in STEPS:
        defaults = [n for n, p in inspect.signature(step).parameters.items() if p.default is not p.empty]
        assert defaults == [], step.__name__


def test_readme_table_is_the_signature() -> None:
    from pipelines.training_pipeline import parameters_markdown

    assert parameters_markdown() in (REPO_ROOT / "README.md").read_text(), \
        "README's run parameter table is stale: paste pipelines.training_pipeline.parameters_markdown()"


def test_every_training_hyperparameter_is_reachable(spec_inputs: dict) -> None:
    train_fields = {f.name for f in dataclasses.fields(config_class("train"))}
    everyday = {field_name for stage, field_name in EVERYDAY.values() if stage == "train"}
    for name in sorted(train_fields - everyday):  # through train_config...
        config = build_config("train", stage_values("train", {"train_config": {name: getattr(config_class("train")(),
                                                                                               name)}}))
        assert getattr(config, name) == getattr(config_class("train")(), name)
    for name in everyday:  # ...or their own parameter, and not both
        with pytest.raises(ConfigError, match="use the parameter"):
            stage_values("train", {"train_config": {name: 1}})
    # what a pipeline run hands over: numbers in a Struct are floats, lists stand for tuples
    config = build_config("train", stage_values("train", {"epochs": 2, "train_config": {"batch_size": 32.0,
                                                                                        "lr": 0.001}}))
    assert (config.epochs, config.batch_size, config.lr) == (2, 32, 0.001) and isinstance(config.batch_size, int)
    drift = build_config("drift", {"statistics": ["mean", "std"]})
    assert drift.statistics == ("mean", "std")


@pytest.mark.parametrize("params, message", [
    ({"train_config": {"lrr": 0.1}}, r"TrainConfig has no field\(s\) \['lrr'\]"),
    ({"model_type": "rnn"}, "TrainConfig.model must be one of"),
    ({"min_accuracy": 1.5}, r"Thresholds.min_accuracy must be a number in \[0, 1\]"),
    ({"validation_config": {"min_class_share": 0.5}}, "ValidationConfig"),
    ({"drift_config": "not json"}, "drift_config(=.*)? is not (JSON|a valid STRUCT)|drift-config: invalid JSON value"),
    ({"drift_action": "panic"}, "drift_action must be one of"),
    ({"shards": 0}, "shards must be a positive int"),
    ({"train_backend": "slurm"}, "train_backend must be one of"),
    ({"champion_tolerance": -1.0}, "champion_tolerance must be a number"),
])
def test_bad_values_are_refused_by_run_and_submit(params: dict, message: str, tmp_path: Path) -> None:
    import json

    from kiln.errors import UsageError
    from pipelines.kfp_client import KfpError, parse_params, read_spec
    from pipelines.run_local import parse_args

    with pytest.raises(ConfigError, match=message):
        check_parameters(params)
    argv = []
    for name, value in params.items():
        argv += [f"--{name.replace('_', '-')}", value if isinstance(value, str) else json.dumps(value)]
    with pytest.raises(UsageError, match=message):  # `kiln` prints it as one line, exit code 2
        parse_args(argv, tmp_path)
    spec, _ = read_spec(REPO_ROOT / "pipelines" / "training_pipeline.yaml")
    pairs = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items()]
    with pytest.raises(KfpError, match=message):
        parse_params(["data_repo=x", *pairs], spec)


def artifact(kind, path: Path, **metadata):
    out = kind(uri=str(path))
    out.metadata.update(metadata)
    return out


def test_nested_configs_reach_validate_and_split(tmp_path: Path) -> None:
    """The component adapters, called with KFP artifacts on 600 digits: the default suite
    refuses so few rows, ``validation_config`` lowers the bar; ``split_config`` moves the split."""
    from components.split import split
    from components.validate import validate

    images, labels = mnist_subset(per_class=60)
    cleaned = artifact(dsl.Dataset, tmp_path / "cleaned", data_version="v1")
    clean_frame(images, labels).to_parquet(cleaned.path, index=False)
    outputs = {name: artifact(kind, tmp_path / name) for name, kind in
               (("report", dsl.HTML), ("suite", dsl.Artifact), ("metrics", dsl.Metrics))}
    with pytest.raises(Exception, match="expect_table_row_count_to_be_between"):
        validate(cleaned=cleaned, validation_config={}, **outputs)
    validate(cleaned=cleaned, validation_config={"min_rows": 100.0}, **outputs)
    assert outputs["metrics"].metadata["expectations_failed"] == 0

    def split_counts(config: dict) -> dict:
        sets = {n: artifact(dsl.Dataset, tmp_path / f"{n}-{len(config)}") for n in ("train_set", "val_set", "test_set")}
        split(cleaned=cleaned, split_config=config, **sets)
        return {n: len(pd.read_parquet(a.path)) for n, a in sets.items()}

    default, wider = split_counts({}), split_counts({"val_fraction": 0.4})
    assert sum(default.values()) == sum(wider.values()) == 600
    assert wider["val_set"] > default["val_set"] + 100
