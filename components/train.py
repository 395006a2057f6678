from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def train(train_set: Input[Dataset], val_set: Input[Dataset], model_type: str, epochs: int, seed: int,
          checkpoint: Output[Model], curves: Output[Metrics], curves_plot: Output[HTML], num_gpus: int = 0):
    """Train the PyTorch classifier (CUDA when present; num_gpus > 1: DDP, one process per GPU
    via torchrun); the best checkpoint is the output, the per-epoch curves are logged as metrics
    and plotted (HTML page, inline PNG)."""
    from kiln.train import run_train

    result = run_train(train_set.path, val_set.path, checkpoint.path,
                       {"model": model_type, "epochs": epochs, "seed": seed}, log_metric=curves.log_metric,
                       curves_path=curves_plot.path, nproc=max(1, num_gpus))
    checkpoint.metadata.update({"framework": "pytorch", "device": result.device, "world_size": result.world_size,
                                "data_version": train_set.metadata.get("data_version", "")})
