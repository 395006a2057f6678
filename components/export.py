from kfp.dsl import Dataset, Input, Model, Output


def export(checkpoint: Input[Model], val_set: Input[Dataset], data_version: str, onnx_model: Output[Model]):
    """Export to ONNX (uint8 pixels in, probabilities + label out) and check parity with PyTorch."""
    from kiln.export import run_export

    report = run_export(checkpoint.path, onnx_model.path, val_set.path, {"data_version": data_version})
    onnx_model.metadata.update({"framework": "onnx", "opset": report.opset, "data_version": data_version,
                                "parity_max_abs_diff": report.max_abs_diff})
