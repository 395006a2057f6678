"""Data-parallel cleaning: a shard plan, per-shard screening and statistics, one merge.

The pipeline fans cleaning out over ``shards`` tasks (KFP ``dsl.ParallelFor``):

1. :func:`plan_shards` (the ingest step) lists ``data/`` at the resolved commit, reading
   only the manifest and the directory listing, and assigns every row to a shard by a
   stable hash of its id (:func:`shard_of`). Each row keeps its position in the raw table
   (``ordinal``), so the order of the unsharded path can be restored.
2. :func:`clean_shard` (one task per shard) fetches that shard's files, runs the per-row
   checks of cleaning (``kiln.clean.screen_rows``) and the per-image statistics of what it
   kept (``kiln.stats.image_statistics``). Rows of one id share a shard, so duplicate ids
   are found there.
3. :func:`merge_shards` concatenates the shards and resolves duplicate pixels across all
   of them (``kiln.clean.resolve_duplicates``, by the pixel hashes every shard emits), so
   the clean table, quarantine, repairs and statistics are exactly those of
   ``kiln.clean.clean_table`` over the whole raw table, whatever the number of shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kiln.clean import (REJECTED_COLUMNS, REPAIR_COLUMNS, SCREENED_COLUMNS, CleanConfig, CleanReport,
                        resolve_duplicates, screen_rows)
from kiln.dataset import RAW_COLUMNS, read_table, write_table
from kiln.ingest import fetch_images, list_data, open_data, raw_table
from kiln.stats import STAT_COLUMNS, image_statistics

PLAN_COLUMNS = ("id", "label", "path", "file", "in_manifest", "ordinal", "shard")
"""One row per raw-table row: what ingest would read, without the bytes, plus the row's
position (``ordinal``) and its shard; ``file`` is the image's file name (null: none)."""
PART_FILES = {"raw": "raw.parquet", "kept": "kept.parquet", "rejected": "rejected.parquet",
              "statistics": "statistics.parquet"}
"""What one shard task writes into its output folder."""


@dataclass(frozen=True)
class ShardPlan:
    """What :func:`plan_shards` wrote: the data version, and the rows per shard."""

    data_version: str
    rows_per_shard: tuple[int, ...]

    @property
    def shards(self) -> list[int]:
        """The shard numbers, the list the pipeline's ParallelFor runs over."""
        return list(range(len(self.rows_per_shard)))


def shard_of(image_id: str, shards: int) -> int:
    """The shard of ``image_id``: sha256 of the id, modulo ``shards``. It depends on the
    id alone, so an image stays in its shard as the data set grows."""
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") % shards


def plan_shards(data_repo: str, data_commit: str, plan_path: str | Path, shards: int, data_path: str = "data",
                expected_version: str | None = None) -> ShardPlan:
    """Write the shard plan (:data:`PLAN_COLUMNS`, Parquet) of ``data_path`` of ``data_repo``
    at ``data_commit`` ("" = a local workspace); no image is read."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    fs, data_version = open_data(data_repo, data_commit, data_path, expected_version)
    plan = pd.DataFrame.from_records(list_data(fs, data_path), columns=list(PLAN_COLUMNS[:5]))
    plan["ordinal"] = range(len(plan))
    plan["shard"] = [shard_of(i, shards) for i in plan["id"]]
    plan = plan.astype({"id": "string", "label": "string", "path": "string", "file": "string",
                        "in_manifest": bool, "ordinal": "int64", "shard": "int64"})
    write_table(plan, plan_path)
    counts = plan["shard"].value_counts()
    return ShardPlan(data_version, tuple(int(counts.get(s, 0)) for s in range(shards)))


def clean_shard(plan_path: str | Path, shard: int, data_repo: str, data_commit: str, out_dir: str | Path,
                config: CleanConfig = CleanConfig(), data_path: str = "data") -> dict[str, int]:
    """Fetch, screen and compute statistics for one shard of the plan into ``out_dir``
    (:data:`PART_FILES`); returns its row counts."""
    plan = read_table(plan_path, PLAN_COLUMNS)
    rows = plan[plan["shard"] == shard].drop(columns="shard")
    names = [str(name) for name in rows["file"].dropna()]
    images = {}
    if names:
        fs, _ = open_data(data_repo, data_commit, data_path)
        images = fetch_images(fs, names, data_path, where=f" (shard {shard}) of {data_repo!r} at "
                                                          f"{data_commit or '<workspace>'}")
    records = [{**row, "file": None if pd.isna(row["file"]) else row["file"]} for row in rows.to_dict("records")]
    raw = raw_table(records, images.__getitem__)
    kept, rejected, statistics = screen_shard(raw, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("raw", raw), ("kept", kept), ("rejected", rejected), ("statistics", statistics)):
        write_table(table, out / PART_FILES[name])
    return {"rows": len(raw), "kept": len(kept), "rejected": len(rejected), "files": len(names)}


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
