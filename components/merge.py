from typing import List

from kfp.dsl import Dataset, Input, Markdown, Output


def merge(parts: Input[List[Dataset]], data_version: str, cleaned: Output[Dataset], quarantine: Output[Dataset],
          repairs: Output[Dataset], statistics: Output[Dataset], quarantined_raw: Output[Dataset],
          summary: Output[Markdown]):
    """Concatenate the shards and resolve duplicate pixels across all of them: the clean
    table, ``quarantine`` (id, path, reason, detail) and ``repairs`` (images converted to
    grayscale or resized) are a full account of the input, whatever the number of shards;
    ``statistics`` are the clean table's per-image statistics; ``quarantined_raw`` the
    quarantined rows' original bytes (the run report's thumbnails)."""
    from kiln.shard import merge_shards

    report = merge_shards([p.path for p in parts], cleaned.path, quarantine.path, repairs.path, statistics.path,
                          summary_path=summary.path, quarantined_raw_path=quarantined_raw.path)
    cleaned.metadata.update({"rows": report.n_clean, "data_version": data_version, "shards": len(parts)})
    statistics.metadata.update({"rows": report.n_clean})
    quarantine.metadata.update({"rows": report.n_quarantined, **report.by_reason})
    repairs.metadata.update({"rows": len(report.repairs), "grayscale": report.converted, "resized": report.resized})
