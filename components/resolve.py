from typing import NamedTuple


def resolve(data_repo: str, data_rev: str) -> NamedTuple("ResolveOutputs", data_commit=str, data_version=str):
    """Pin ``data_rev`` of ``data_repo`` to a git commit and the DVC md5 of data/, reading no
    data. Never cached: its outputs are the cache key of ingest and everything downstream."""
    from kiln.ingest import resolve as run

    result = run(data_repo, data_rev)
    print(f"data_rev {data_rev or '<default>'!r} of {data_repo} -> commit {result.commit or '<workspace>'}, "
          f"data version {result.data_version}")
    return (result.commit, result.data_version)
