from typing import NamedTuple

from kfp.dsl import Dataset, Output


def ingest(data_repo: str, data_rev: str, raw: Output[Dataset]) -> NamedTuple("IngestOutputs", data_version=str):
    """Read data/ from the DVC repository ``data_repo`` at ``data_rev`` ("" = its workspace)."""
    from kiln.ingest import ingest as run

    result = run(data_repo, data_rev, raw.path)
    raw.metadata.update({"data_version": result.data_version, "data_repo": data_repo, "data_rev": data_rev,
                         "rows": result.n_rows, "manifest_rows": result.n_manifest, "files": result.n_files})
    return (result.data_version,)
