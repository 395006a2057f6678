from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def drift(cleaned: Input[Dataset], model_store: str, model_name: str, drift_action: str,
          report: Output[HTML], metrics: Output[Metrics]):
    """PSI per image statistic and chi-square on labels vs the production model's stats.parquet;
    drift_action "fail" fails the run naming the drifted statistics, "warn" only reports."""
    from kiln.drift import run_drift

    run_drift(cleaned.path, model_store, model_name, report.path, drift_action, log_metric=metrics.log_metric)
