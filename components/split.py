from kfp.dsl import Dataset, Input, Output


def split(cleaned: Input[Dataset], train_set: Output[Dataset], val_set: Output[Dataset], test_set: Output[Dataset]):
    """Deterministic train/val/test split by a hash of each image's pixels (each class split in the
    requested proportions in expectation; stable as the data grows)."""
    from kiln.split import run_split

    counts = run_split(cleaned.path, {"train": train_set.path, "val": val_set.path, "test": test_set.path})
    for artifact, name in ((train_set, "train"), (val_set, "val"), (test_set, "test")):
        artifact.metadata.update({"rows": counts[name], "data_version": cleaned.metadata.get("data_version", "")})
