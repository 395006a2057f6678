"""Per-image summary statistics of a clean table (see ``kiln.dataset``).

Data validation runs on these statistics rather than on the pixels: one narrow row per
image (a dozen columns) instead of 784 pixel columns keeps Great Expectations fast
(hundreds of times fewer metric computations), while still seeing every property the
suite checks: shape, brightness, contrast, amount of ink and identity of the content.

The drift reference (:func:`reference_statistics`, stored with each deployed model by
:func:`save_reference_statistics`) is the same table without ids and hashes; it lives
here because deploy writes it and drift reads it, and neither stage imports the other.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from kiln.dataset import CLEAN_COLUMNS, read_table

INK_THRESHOLD = 127
"""A pixel counts as ink when its value is strictly greater than this (i.e. >= 128).

Half the 8-bit range, so anti-aliased stroke edges and faint background noise (values
1..127) do not count: ``ink_fraction`` measures the solid strokes only. On the 5,000
MNIST digits it lies in 0.029..0.306 (mean 0.133); with ``> 0`` it would be 0.059..0.386.
"""

STAT_COLUMNS: tuple[str, ...] = (
    "id",
    "label",
    "width",
    "height",
    "mean",
    "std",
    "min",
    "max",
    "ink_fraction",
    "content_hash",
    "computed_sha256",
)
"""Columns of ``image_statistics``'s result, in order."""

_CHUNK_ROWS = 8192
"""Images processed per numpy step: bounds the int32 working copy to ~25 MiB whatever N is."""


def _shape_of(n_bytes: int) -> tuple[int, int]:
    """(width, height) inferred from a flat buffer's length.

    The clean table stores no shape, only row-major bytes, so a buffer of s*s bytes is
    taken as an s x s image; any other length n is reported as width n, height 1 (one
    row), which no square-size expectation accepts.
    """
    side = math.isqrt(n_bytes)
    return (side, side) if side * side == n_bytes else (n_bytes, 1)


def _pixel_stats(flat: np.ndarray) -> dict[str, np.ndarray]:
    """Row statistics of a uint8 [n, L] array (L > 0), computed in bounded-memory chunks.

    Variance comes from exact integer sums (sum and sum of squares fit int64/int32 for
    any L up to millions), so no float64 copy of the whole array is ever made.
    """
    n, length = flat.shape
    out = {
        "mean": np.empty(n, np.float64),
        "std": np.empty(n, np.float64),
        "min": np.empty(n, np.int64),
        "max": np.empty(n, np.int64),
        "ink_fraction": np.empty(n, np.float64),
    }
    for start in range(0, n, _CHUNK_ROWS):
        block = flat[start : start + _CHUNK_ROWS]
        wide = block.astype(np.int32)
        total = wide.sum(axis=1, dtype=np.int64)
        squares = np.einsum("ij,ij->i", wide, wide, dtype=np.int64)
        mean = total / length
        rows = slice(start, start + len(block))
        out["mean"][rows] = mean
        # max(0, .) guards against -1e-12 from float rounding on constant images.
        out["std"][rows] = np.sqrt(np.maximum(squares / length - mean * mean, 0.0))
        out["min"][rows] = block.min(axis=1)
        out["max"][rows] = block.max(axis=1)
        out["ink_fraction"][rows] = np.count_nonzero(block > INK_THRESHOLD, axis=1) / length
    return out


def image_statistics(df: pd.DataFrame) -> pd.DataFrame:
    """One row per image of the clean table ``df``, in the same order, with STAT_COLUMNS.

    * ``id``, ``label``: copied unchanged (a null stays null);
    * ``width``, ``height`` (Int64): shape inferred from the byte count (see ``_shape_of``);
    * ``mean``, ``std`` (float64): population mean and standard deviation of the 0..255
      pixel values; ``min``, ``max`` (Int64): extreme pixel values;
    * ``ink_fraction`` (float64): share of pixels > INK_THRESHOLD;
    * ``content_hash``: the table's recorded ``sha256`` column, unchanged;
    * ``computed_sha256``: hex sha256 of the ``pixels`` bytes actually stored, so a
      validator can check the recorded hash.

    A row whose ``pixels`` is null (or not bytes) gets nulls in every pixel-derived
    column; an empty buffer gets width = height = 0 and null intensity statistics. The
    work is vectorised per distinct buffer length (one group for a well-formed table),
    so 500k images take seconds. Raises KeyError when a clean column is missing.
    """
    n = len(df)
    blobs = df["pixels"].tolist()
    lengths = np.fromiter(
        (len(b) if isinstance(b, (bytes, bytearray, memoryview)) else -1 for b in blobs),
        dtype=np.int64,
        count=n,
    )

    # Integer columns are numpy values plus a null mask, turned into nullable Int64 at
    # the end: cheap for any N, unlike building pd.NA object lists.
    ints = {key: np.zeros(n, np.int64) for key in ("width", "height", "min", "max")}
    missing = {key: np.ones(n, bool) for key in ints}
    floats = {key: np.full(n, np.nan) for key in ("mean", "std", "ink_fraction")}

    for length in np.unique(lengths):
        if length < 0:
            continue  # null / non-bytes: leave every derived value null
        rows = np.flatnonzero(lengths == length)
        ints["width"][rows], ints["height"][rows] = _shape_of(int(length))
        missing["width"][rows] = missing["height"][rows] = False
        if length == 0:
            continue  # no pixels: intensity statistics are undefined
        flat = np.frombuffer(b"".join(blobs[i] for i in rows), dtype=np.uint8).reshape(len(rows), int(length))
        group = _pixel_stats(flat)
        for key in floats:
            floats[key][rows] = group[key]
        for key in ("min", "max"):
            ints[key][rows] = group[key]
            missing[key][rows] = False

    computed = [
        hashlib.sha256(b).hexdigest() if isinstance(b, (bytes, bytearray, memoryview)) else None for b in blobs
    ]
    nullable = {key: pd.arrays.IntegerArray(ints[key], missing[key]) for key in ints}
    passthrough = df[["id", "label", "sha256"]].reset_index(drop=True)  # keeps dtypes
    return pd.DataFrame(
        {
            "id": passthrough["id"],
            "label": passthrough["label"],
            **{key: nullable[key] for key in ("width", "height")},
            "mean": floats["mean"],
            "std": floats["std"],
            **{key: nullable[key] for key in ("min", "max")},
            "ink_fraction": floats["ink_fraction"],
            "content_hash": passthrough["sha256"],
            "computed_sha256": pd.Series(computed, dtype=object),
        },
        columns=list(STAT_COLUMNS),
    )


# --------------------------------------------------------------------------- drift reference

STATS_FILE = "stats.parquet"
"""Name of the reference statistics file in a model-store version directory."""

REFERENCE_COLUMNS: tuple[str, ...] = ("label", "width", "height", "mean", "std", "min", "max", "ink_fraction")
"""Columns of ``reference_statistics``'s result, in order."""


def reference_statistics(clean_df: pd.DataFrame) -> pd.DataFrame:
    """Per-image statistics of a clean table without id/hash columns (REFERENCE_COLUMNS)."""
    stats = image_statistics(clean_df)
    return stats[list(REFERENCE_COLUMNS)].reset_index(drop=True)


def save_reference_statistics(clean_path: str | Path, version_dir: str | Path) -> Path:
    """Write ``reference_statistics`` of the clean Parquet table at ``clean_path`` to
    ``version_dir/stats.parquet`` (atomically: temp file + rename) and return its path."""
    df = read_table(clean_path, CLEAN_COLUMNS)
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise FileNotFoundError(f"no model version directory {version_dir}")
    fd, tmp = tempfile.mkstemp(prefix=".stats-", suffix=".parquet", dir=version_dir)
    os.close(fd)
    try:
        reference_statistics(df).to_parquet(tmp, index=False)
        os.replace(tmp, version_dir / STATS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return version_dir / STATS_FILE
