from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def drift(cleaned: Input[Dataset], model_store: str, model_name: str, drift_action: str, drift_config: dict,
          report: Output[HTML], metrics: Output[Metrics]):
    """PSI per image statistic and chi-square on labels vs the production model's stats.parquet;
    drift_action "fail" fails the run naming the drifted statistics, "warn" only reports.
    ``drift_config``: DriftConfig fields to change."""
    from kiln.config import build_config, stage_values
    from kiln.drift import run_drift

    config = build_config("drift", stage_values("drift", {"drift_config": drift_config}))
    run_drift(cleaned.path, model_store, model_name, report.path, drift_action, log_metric=metrics.log_metric,
              config=config)
