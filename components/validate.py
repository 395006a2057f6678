from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def validate(cleaned: Input[Dataset], validation_config: dict, report: Output[HTML], suite: Output[Artifact],
             metrics: Output[Metrics]):
    """Great Expectations suite over per-image statistics; fails the run naming each failed
    expectation. ``validation_config``: ValidationConfig fields to change."""
    from kiln.config import build_config, stage_values
    from kiln.validate import run_validation

    config = build_config("validation", stage_values("validation", {"validation_config": validation_config}))
    run_validation(cleaned.path, report.path, suite.path, config=config, log_metric=metrics.log_metric)
