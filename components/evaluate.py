from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(onnx_model: Input[Model], test_set: Input[Dataset], min_accuracy: float, min_macro_recall: float,
             min_class_recall: float, metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
             predictions: Output[Dataset], verdict: Output[Markdown], report: Output[HTML],
             model_store: str, model_name: str, champion_tolerance: float) -> bool:
    """Evaluate the ONNX model in ONNX Runtime on the test split against the thresholds and,
    when ``model_store`` has a production ``model_name``, against that champion; return
    whether it is blessed.

    A single unnamed return (not a NamedTuple): kfp.local's dsl.If resolves only
    ``<task>-Output`` channels, and the cluster treats both alike.
    """
    from kiln.evaluate import production_onnx_path, run_evaluate

    result = run_evaluate(onnx_model.path, test_set.path, predictions.path, verdict.path,
                          {"min_accuracy": min_accuracy, "min_macro_recall": min_macro_recall,
                           "min_class_recall": min_class_recall},
                          log_metric=metrics.log_metric,
                          champion_onnx_path=production_onnx_path(model_store, model_name),
                          tolerance=champion_tolerance, report_path=report.path)
    confusion.log_confusion_matrix(result.labels, result.confusion_matrix)
    return result.blessed
