from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def report(raw: Input[Dataset], cleaned: Input[Dataset], quarantine: Input[Dataset], repairs: Input[Dataset],
           validation: Input[Metrics], drift: Input[Metrics], curves: Input[Metrics], onnx_model: Input[Model],
           variants: Input[Model], metrics: Input[Metrics], predictions: Input[Dataset], verdict: Input[Markdown],
           blessed: bool, deployed_version: str, run_name: str, data_repo: str, data_rev: str, data_commit: str,
           data_version: str, model_store: str, model_name: str, parameters: dict, page: Output[HTML]):
    """One self-contained HTML page of the whole run: lineage, cleaning, validation, drift,
    training curves, evaluation, export, champion and verdict. It runs whether or not the
    model was blessed; ``deployed_version`` is "" when nothing was deployed."""
    from kiln.config import plain_parameters
    from kiln.deploy import git_commit
    from kiln.report import Lineage, collect_run, write_report

    lineage = Lineage(git_commit=git_commit(), data_version=data_version, data_repo=data_repo, data_rev=data_rev,
                      run=run_name, parameters={**plain_parameters(parameters), "data_commit": data_commit or "(workspace)"})
    run = collect_run(lineage, raw=raw.path, cleaned=cleaned.path, quarantine=quarantine.path, repairs=repairs.path,
                      validation_metrics=dict(validation.metadata), drift_metrics=dict(drift.metadata),
                      curves_metrics=dict(curves.metadata), onnx_metadata=dict(onnx_model.metadata),
                      variants_dir=variants.path, eval_metrics=dict(metrics.metadata), predictions=predictions.path,
                      verdict=verdict.path, blessed=blessed, deployed_version=deployed_version or None,
                      model_store=model_store, model_name=model_name)
    write_report(run, page.path)
    page.metadata.update({"blessed": blessed, "deployed_version": deployed_version})
