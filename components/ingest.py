from typing import NamedTuple

from kfp.dsl import Dataset, Output


def ingest(data_repo: str, data_commit: str, data_version: str,
           raw: Output[Dataset]) -> NamedTuple("IngestOutputs", data_version=str):
    """Read data/ from the DVC repository ``data_repo`` at the commit resolve pinned ("" = its
    workspace), failing if it is not ``data_version``; cached on exactly these inputs."""
    from kiln.ingest import ingest as run

    result = run(data_repo, data_commit, raw.path, expected_version=data_version)
    raw.metadata.update({"data_version": result.data_version, "data_repo": data_repo, "data_commit": data_commit,
                         "rows": result.n_rows, "manifest_rows": result.n_manifest, "files": result.n_files})
    return (result.data_version,)
