from kfp.dsl import Dataset, Input, Model, Output


def export(checkpoint: Input[Model], train_set: Input[Dataset], val_set: Input[Dataset], data_version: str,
           onnx_model: Output[Model], variants: Output[Model]):
    """Export to ONNX (uint8 pixels in, probabilities + label out) and check parity with PyTorch
    over the whole validation split; then build int8 / fp16 variants into the ``variants``
    folder (int8 calibrated on training images; only those within 0.3 accuracy points of the
    fp32 model on the validation split are kept; ``variants.json`` records all). The test
    split is not an input: it is left to the final evaluation."""
    from kiln.export import run_export, run_export_variants

    report = run_export(checkpoint.path, onnx_model.path, val_set.path, {"data_version": data_version})
    onnx_model.metadata.update({"framework": "onnx", "opset": report.opset, "data_version": data_version,
                                "parity_max_abs_diff": report.max_abs_diff})
    summary = run_export_variants(onnx_model.path, variants.path, val_set.path, calibration_path=train_set.path)
    variants.metadata.update({"framework": "onnx", "data_version": data_version, "max_accuracy_drop": summary["max_drop"],
                              **{f"{name}_ships": v["ships"] for name, v in summary["variants"].items()},
                              **{f"{name}_accuracy_drop": v["accuracy_drop"] for name, v in summary["variants"].items()
                                 if v["accuracy_drop"] is not None}})
