from typing import NamedTuple

from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(onnx_model: Input[Model], test_set: Input[Dataset], min_accuracy: float, min_macro_recall: float,
             min_class_recall: float, metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
             predictions: Output[Dataset], verdict: Output[Markdown]) -> NamedTuple("EvaluateOutputs", blessed=bool):
    """Evaluate the ONNX model in ONNX Runtime on the test split; bless it against the thresholds."""
    from kiln.evaluate import run_evaluate

    result = run_evaluate(onnx_model.path, test_set.path, predictions.path, verdict.path,
                          {"min_accuracy": min_accuracy, "min_macro_recall": min_macro_recall,
                           "min_class_recall": min_class_recall},
                          log_metric=metrics.log_metric)
    confusion.log_confusion_matrix(result.labels, result.confusion_matrix)
    return (result.blessed,)
