from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def train(train_set: Input[Dataset], val_set: Input[Dataset], model_type: str, epochs: int, seed: int,
          train_config: dict, num_gpus: int, backend: str, num_nodes: int, procs_per_node: int, trainjob: dict,
          checkpoint: Output[Model], curves: Output[Metrics], curves_plot: Output[HTML]):
    """Train the PyTorch classifier; the best checkpoint is the output, the per-epoch curves
    are logged as metrics and plotted (HTML page, inline PNG). ``train_config``: any other
    TrainConfig fields. ``backend`` "pod": here (CUDA when present; num_gpus > 1: DDP, one
    process per GPU via torchrun); "trainjob": on a Kubeflow Trainer TrainJob of num_nodes x
    procs_per_node workers (num_gpus each), through the model-store volume this pod mounts
    (``trainjob``: the compiled image, namespace, PVC and mount)."""
    import dataclasses

    from kiln.config import build_config, stage_values
    from kiln.train import report_result, run_train

    config = build_config("train", stage_values("train", {"model_type": model_type, "epochs": epochs, "seed": seed,
                                                          "train_config": train_config}))
    if backend == "trainjob":
        from kiln.trainjob import TrainJobOptions, run_trainjob

        if not trainjob:
            raise ValueError("the trainjob backend needs the cluster build of the pipeline (kiln compile)")
        options = TrainJobOptions(**trainjob, num_nodes=num_nodes, procs_per_node=procs_per_node, gpus=num_gpus)
        result = report_result(run_trainjob(options, train_set.path, val_set.path, checkpoint.path,
                                            dataclasses.asdict(config)),
                               log_metric=curves.log_metric, curves_path=curves_plot.path)
    else:
        result = run_train(train_set.path, val_set.path, checkpoint.path, dataclasses.asdict(config),
                           log_metric=curves.log_metric, curves_path=curves_plot.path, nproc=max(1, num_gpus))
    checkpoint.metadata.update({"framework": "pytorch", "device": result.device, "world_size": result.world_size,
                                "data_version": train_set.metadata.get("data_version", ""), "backend": backend})
