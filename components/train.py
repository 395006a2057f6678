from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def train(train_set: Input[Dataset], val_set: Input[Dataset], model_type: str, epochs: int, seed: int,
          train_config: dict, num_gpus: int, checkpoint: Output[Model], curves: Output[Metrics],
          curves_plot: Output[HTML]):
    """Train the PyTorch classifier (CUDA when present; num_gpus > 1: DDP, one process per GPU
    via torchrun); the best checkpoint is the output, the per-epoch curves are logged as metrics
    and plotted (HTML page, inline PNG). ``train_config``: any other TrainConfig fields."""
    import dataclasses

    from kiln.config import build_config, stage_values
    from kiln.train import run_train

    config = build_config("train", stage_values("train", {"model_type": model_type, "epochs": epochs, "seed": seed,
                                                          "train_config": train_config}))
    result = run_train(train_set.path, val_set.path, checkpoint.path, dataclasses.asdict(config),
                       log_metric=curves.log_metric,
                       curves_path=curves_plot.path, nproc=max(1, num_gpus))
    checkpoint.metadata.update({"framework": "pytorch", "device": result.device, "world_size": result.world_size,
                                "data_version": train_set.metadata.get("data_version", "")})
