"""Data-parallel cleaning: per-shard screening and statistics, one merge (a helper of clean).

The pipeline fans cleaning out over ``shards`` tasks (KFP ``dsl.ParallelFor``):

1. ``kiln.ingest.plan_shards`` (the ingest step) lists ``data/`` at the resolved commit,
   reading only the manifest and the directory listing, and assigns every row to a shard
   by a stable hash of its id (``kiln.ingest.shard_of``). Each row keeps its position in
   the raw table (``ordinal``), so the order of the unsharded path can be restored.
2. Each shard task fetches its files (``kiln.ingest.fetch_shard``); :func:`clean_shard`
   runs the per-row checks of cleaning (``kiln.clean.screen_rows``) and the per-image
   statistics of what it kept (``kiln.stats.image_statistics``). Rows of one id share a
   shard, so duplicate ids are found there.
3. :func:`merge_shards` concatenates the shards and resolves duplicate pixels across all
   of them (``kiln.clean.resolve_duplicates``, by the pixel hashes every shard emits), so
   the clean table, quarantine, repairs and statistics are exactly those of
   ``kiln.clean.clean_table`` over the whole raw table, whatever the number of shards.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kiln.clean import (REJECTED_COLUMNS, REPAIR_COLUMNS, SCREENED_COLUMNS, CleanConfig, CleanReport,
                        resolve_duplicates, screen_rows)
from kiln.dataset import RAW_COLUMNS, read_table, write_table
from kiln.stats import STAT_COLUMNS, image_statistics

PART_FILES = {"raw": "raw.parquet", "kept": "kept.parquet", "rejected": "rejected.parquet",
              "statistics": "statistics.parquet"}
"""What one shard task writes into its output folder."""


def clean_shard(raw: pd.DataFrame, out_dir: str | Path, config: CleanConfig = CleanConfig()) -> dict[str, int]:
    """A shard's work on its raw table (``kiln.ingest.fetch_shard``): :func:`screen_shard`,
    written into ``out_dir`` (:data:`PART_FILES`) with the raw rows; returns row counts."""
    kept, rejected, statistics = screen_shard(raw, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("raw", raw), ("kept", kept), ("rejected", rejected), ("statistics", statistics)):
        write_table(table, out / PART_FILES[name])
    return {"rows": len(raw), "kept": len(kept), "rejected": len(rejected)}


def screen_shard(raw: pd.DataFrame, config: CleanConfig = CleanConfig()) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                   pd.DataFrame]:
    """A shard's work on its raw rows (with ``ordinal``): (kept, rejected, statistics of
    the kept images with their ``ordinal``)."""
    kept, rejected = screen_rows(raw, config)
    statistics = image_statistics(kept)
    statistics.insert(0, "ordinal", kept["ordinal"].to_numpy())
    return kept, rejected, statistics


def merge_frames(kept: pd.DataFrame, rejected: pd.DataFrame,
                 statistics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, CleanReport, pd.DataFrame]:
    """Every shard's :func:`screen_shard` outputs, concatenated, as one: (clean table,
    quarantine, report, statistics of the clean table in its order)."""
    clean, quarantine, report = resolve_duplicates(kept, rejected)
    statistics = statistics.set_index("id", drop=False).loc[clean["id"].tolist(), list(STAT_COLUMNS)]
    statistics = statistics.reset_index(drop=True)
    statistics = statistics.astype({"id": "string", "computed_sha256": object})  # as image_statistics types them
    return clean, quarantine, report, statistics


def _concat(parts: list[Path], name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    tables = [read_table(Path(part) / PART_FILES[name], columns) for part in parts]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(columns))


def merge_parts(parts: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame, CleanReport, pd.DataFrame]:
    """The shards' outputs as one: (clean table, quarantine, report, statistics of the
    clean table in its order), duplicates resolved across every shard."""
    folders = [Path(p) for p in parts]
    return merge_frames(_concat(folders, "kept", SCREENED_COLUMNS), _concat(folders, "rejected", REJECTED_COLUMNS),
                        _concat(folders, "statistics", ("ordinal", *STAT_COLUMNS)))


def quarantined_raw(parts: list[str | Path], quarantine: pd.DataFrame) -> pd.DataFrame:
    """The raw rows (:data:`~kiln.dataset.RAW_COLUMNS`, with their bytes) of every
    quarantined path, read from the shards' raw tables: what the run report shows."""
    import pyarrow.parquet as pq

    paths = sorted(set(quarantine["path"]))
    tables = [pq.read_table(Path(p) / PART_FILES["raw"], columns=[*RAW_COLUMNS, "ordinal"],
                            filters=[("path", "in", paths)]).to_pandas() for p in parts] if paths else []
    if not tables:
        return pd.DataFrame(columns=list(RAW_COLUMNS))
    rows = pd.concat(tables, ignore_index=True).sort_values("ordinal", kind="stable")
    return rows[list(RAW_COLUMNS)].reset_index(drop=True)


def merge_shards(parts: list[str | Path], clean_path: str | Path, quarantine_path: str | Path,
                 repairs_path: str | Path, statistics_path: str | Path, summary_path: str | Path | None = None,
                 quarantined_raw_path: str | Path | None = None) -> CleanReport:
    """:func:`merge_parts` written out as ``kiln.clean.run_clean`` writes its outputs
    (clean Parquet, quarantine CSV, repairs CSV, Markdown summary), plus the statistics
    (Parquet) and, optionally, :func:`quarantined_raw` (Parquet)."""
    clean, quarantine, report, statistics = merge_parts(parts)
    write_table(clean, clean_path)
    write_table(statistics, statistics_path)
    for path, table in ((quarantine_path, quarantine),
                        (repairs_path, pd.DataFrame.from_records(report.repairs, columns=list(REPAIR_COLUMNS)))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
    if summary_path is not None:
        Path(summary_path).write_text(report.markdown())
    if quarantined_raw_path is not None:
        write_table(quarantined_raw(parts, quarantine), quarantined_raw_path)
    return report
