from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train(train_set: Input[Dataset], val_set: Input[Dataset], model_type: str, epochs: int, seed: int,
          checkpoint: Output[Model], curves: Output[Metrics]):
    """Train the PyTorch classifier (CUDA when present); the best checkpoint is the output."""
    from kiln.train import run_train

    result = run_train(train_set.path, val_set.path, checkpoint.path,
                       {"model": model_type, "epochs": epochs, "seed": seed}, log_metric=curves.log_metric)
    checkpoint.metadata.update({"framework": "pytorch", "device": result.device,
                                "data_version": train_set.metadata.get("data_version", "")})
