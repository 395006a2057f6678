from kfp.dsl import Dataset, Input, Output


def shard(plan: Input[Dataset], shard: int, data_repo: str, resize_wrong_size: bool, part: Output[Dataset]):
    """One shard of cleaning: fetch the shard's files at the commit the plan was made at,
    check each row (quarantining the unusable) and compute the per-image statistics of what
    it kept; duplicates across shards are left to merge."""
    from kiln.clean import CleanConfig
    from kiln.ingest import fetch_shard
    from kiln.shard import clean_shard

    # The commit travels in the plan's metadata, not as a parameter: kfp.local (2.17) gives a
    # ParallelFor body's task-output parameters the loop item instead of their value.
    raw = fetch_shard(plan.path, shard, data_repo, plan.metadata["data_commit"])
    counts = clean_shard(raw, part.path, CleanConfig(resize_wrong_size=resize_wrong_size))
    part.metadata.update({"shard": shard, **counts})
