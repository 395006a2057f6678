"""Split: assign each clean image to train, val or test by a hash of its content.

An image's split depends only on its pixels (its sha256), the salt and the split
fractions, never on which other images exist: when the dataset grows, no old image
changes split (no test image ever moves into training).

This is *not* an exactly stratified split, and cannot be one without giving that up:
an exact per-class quota depends on how many images the class has, so adding images
would move old ones across splits. Because the hash is uniform and independent of the
label, each class gets the requested fractions in expectation, with binomial noise: a
class of n images sends ``fraction * n +- sqrt(fraction * (1 - fraction) * n)`` images to
each split (on the 5,000 bundled digits, ~500 per class, the per-class test share lies
between 8.6% and 12.8% for the requested 10%). :func:`run_split` refuses a split that
lacks a class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kiln.dataset import CLEAN_COLUMNS, read_table, write_table

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """val_fraction/test_fraction: expected shares of each class sent to val and test (the rest trains).

    salt: mixed into the hash; changing it reshuffles every split (do so only on purpose).
    """

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    salt: str = "kiln-split-v1"

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"need 0 < val, test and val + test < 1; got val={self.val_fraction}, test={self.test_fraction}")


def split_unit(sha256: pd.Series, salt: str) -> np.ndarray:
    """Map each content hash to a number in [0, 1), stable across runs and platforms."""
    return np.array(
        [int.from_bytes(hashlib.sha256(f"{salt}:{h}".encode()).digest()[:8], "big") / 2**64 for h in sha256],
        dtype=np.float64,
    )


def assign_splits(clean: pd.DataFrame, config: SplitConfig = SplitConfig()) -> pd.Series:
    """The split name of every row of ``clean``, as a Series aligned with it."""
    u = split_unit(clean["sha256"], config.salt)
    names = np.where(u < config.test_fraction, "test", np.where(u < config.test_fraction + config.val_fraction, "val", "train"))
    return pd.Series(names, index=clean.index, name="split")


def run_split(clean_path: str | Path, out_paths: dict[str, str | Path], config: SplitConfig = SplitConfig()) -> dict[str, int]:
    """Write the train/val/test tables to ``out_paths[name]``; return the row count of each.

    Raises ValueError when a split would be empty or lack a class that the data has,
    since training or evaluating on it would silently mislead.
    """
    clean = read_table(clean_path, CLEAN_COLUMNS)
    splits = assign_splits(clean, config)
    counts = {}
    all_labels = set(clean["label"].unique())
    for name in SPLITS:
        part = clean[splits == name].reset_index(drop=True)
        missing = all_labels - set(part["label"].unique())
        if part.empty or missing:
            raise ValueError(f"split {name!r} has {len(part)} rows and lacks labels {sorted(missing)}: the dataset is too small")
        write_table(part, out_paths[name])
        counts[name] = len(part)
    return counts
