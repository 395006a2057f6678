"""Tables that flow between pipeline stages, stored as Parquet.

Two shapes exist:

* a *raw* table (output of ingest): one row per manifest entry or image file, with
  columns ``id`` (str), ``label`` (str or null, exactly as written in the manifest),
  ``path`` (str, relative to the data root), ``png`` (bytes or null when the file is
  missing) and ``in_manifest`` (bool: false for an image file the manifest omits);
* a *clean* table (output of clean and split): ``id`` (str), ``label`` (int64),
  ``pixels`` (IMAGE_SIZE*IMAGE_SIZE raw uint8 bytes, row-major) and ``sha256`` (hex
  digest of ``pixels``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kiln.contract import IMAGE_SIZE

RAW_COLUMNS = ("id", "label", "path", "png", "in_manifest")
CLEAN_COLUMNS = ("id", "label", "pixels", "sha256")


class DatasetError(ValueError):
    """A table does not have the shape its stage requires."""


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` to Parquet at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


def read_table(path: str | Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a Parquet table and check it has ``columns``; raise DatasetError if not."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"table not found: {path}")
    df = pd.read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing}; has {list(df.columns)}")
    return df


def to_arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Clean table -> (pixels uint8 [N, 28, 28], labels int64 [N])."""
    n = len(df)
    if n == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.zeros(0, np.int64)
    flat = np.frombuffer(b"".join(df["pixels"].tolist()), dtype=np.uint8)
    if flat.size != n * IMAGE_SIZE * IMAGE_SIZE:
        raise DatasetError(f"pixels column holds {flat.size} bytes for {n} images")
    return flat.reshape(n, IMAGE_SIZE, IMAGE_SIZE), df["label"].to_numpy(np.int64)
