"""Splits are deterministic, never move an image when the data grows, and give each class
its fractions in expectation (binomial noise, not exact stratification: see kiln.split)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from helpers import clean_frame, mnist_subset
from kiln.dataset import write_table
from kiln.split import SplitConfig, assign_splits, run_split


@pytest.fixture(scope="module")
def v1_v2() -> tuple[pd.DataFrame, pd.DataFrame]:
    images, labels = mnist_subset(per_class=200)
    v2 = clean_frame(images, labels)
    v1 = v2.groupby("label").head(100).reset_index(drop=True)  # v2 = v1 + 1,000 new images
    return v1, v2


def test_old_images_keep_their_split_when_data_grows(v1_v2) -> None:
    v1, v2 = v1_v2
    s1 = dict(zip(v1["id"], assign_splits(v1)))
    s2 = dict(zip(v2["id"], assign_splits(v2)))
    assert all(s2[i] == s for i, s in s1.items())
    assert not any(s1[i] == "test" and s2[i] == "train" for i in s1)


def test_split_is_deterministic_with_class_shares_near_the_fractions(v1_v2, tmp_path: Path) -> None:
    _, v2 = v1_v2
    clean = write_table(v2, tmp_path / "clean.parquet")
    paths = {n: tmp_path / f"{n}.parquet" for n in ("train", "val", "test")}
    counts = run_split(clean, paths)
    assert sum(counts.values()) == len(v2)
    test = pd.read_parquet(paths["test"])
    shares = test["label"].value_counts() / v2["label"].value_counts()
    assert shares.between(0.04, 0.17).all(), shares  # 10% of 200 per class, hash noise allowed
    assert set(pd.read_parquet(paths["train"])["id"]).isdisjoint(test["id"])
    again = {n: tmp_path / f"again-{n}.parquet" for n in paths}
    run_split(clean, again)
    assert pd.read_parquet(again["test"])["id"].tolist() == test["id"].tolist()


def test_class_shares_follow_binomial_noise_not_exact_quotas() -> None:
    """On all 5,000 bundled digits: every class's val and test share is within 4 binomial
    standard deviations of 10% (what a label-blind hash gives), and, as README says,
    the shares are not exact quotas."""
    import numpy as np

    from kiln.data import mnist_5k

    images, labels = mnist_5k()
    clean = clean_frame(images, labels)
    shares = pd.crosstab(clean["label"], assign_splits(clean), normalize="index")
    n = clean["label"].value_counts().sort_index()
    sigma = np.sqrt(0.1 * 0.9 / n)
    for name in ("val", "test"):
        assert ((shares[name] - 0.1).abs() <= 4 * sigma).all(), shares[name]
    assert shares["test"].max() - shares["test"].min() > 0.01  # hash noise, not quotas
    assert abs(float((assign_splits(clean) == "test").mean()) - 0.1) < 0.015  # overall ~10%


def test_a_different_salt_reshuffles(v1_v2) -> None:
    _, v2 = v1_v2
    assert (assign_splits(v2) != assign_splits(v2, SplitConfig(salt="other"))).mean() > 0.1


def test_too_small_dataset_is_refused(tmp_path: Path) -> None:
    images, labels = mnist_subset(per_class=1)
    clean = write_table(clean_frame(images, labels), tmp_path / "clean.parquet")
    with pytest.raises(ValueError, match="too small"):
        run_split(clean, {n: tmp_path / f"{n}.parquet" for n in ("train", "val", "test")})


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError):
        SplitConfig(val_fraction=0.5, test_fraction=0.6)
