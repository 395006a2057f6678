from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def validate(cleaned: Input[Dataset], report: Output[HTML], suite: Output[Artifact], metrics: Output[Metrics]):
    """Great Expectations suite over per-image statistics; fails the run naming each failed expectation."""
    from kiln.validate import run_validation

    run_validation(cleaned.path, report.path, suite.path, log_metric=metrics.log_metric)
