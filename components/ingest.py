from typing import List

from kfp.dsl import Dataset, Output


def ingest(data_repo: str, data_commit: str, data_version: str, shards: int, plan: Output[Dataset]) -> List[int]:
    """List data/ of the DVC repository ``data_repo`` at the commit resolve pinned ("" = its
    workspace), failing if it is not ``data_version``, and plan ``shards`` shards of it (file
    ids by a stable hash); reads no image. Returns the shard numbers the clean fan-out runs over."""
    from kiln.ingest import plan_shards

    result = plan_shards(data_repo, data_commit, plan.path, shards, expected_version=data_version)
    plan.metadata.update({"data_version": result.data_version, "data_repo": data_repo, "data_commit": data_commit,
                          "rows": sum(result.rows_per_shard), "shards": shards,
                          **{f"shard{i}_rows": n for i, n in enumerate(result.rows_per_shard)}})
    return result.shards
