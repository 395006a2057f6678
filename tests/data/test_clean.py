"""Cleaning accounts for every input row: each corruption is quarantined with its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import mnist_subset, plant_faults, png_bytes
from kiln.clean import CleanConfig, Reason, clean_table, run_clean
from kiln.data import encode_png, write_dataset
from kiln.dataset import to_arrays, write_table
from kiln.ingest import raw_table_from_dir

IMAGES, LABELS = mnist_subset(per_class=2)


@pytest.fixture()
def corrupted(tmp_path: Path) -> Path:
    """A dataset folder with one example of every kind of damage, plus good images."""
    return plant_faults(write_dataset(tmp_path / "data", IMAGES, LABELS), IMAGES)


def test_every_corruption_is_quarantined_with_its_reason(corrupted: Path, tmp_path: Path) -> None:
    raw = raw_table_from_dir(corrupted)
    clean, quarantine, report = clean_table(raw)
    reasons = dict(zip(quarantine["id"], quarantine["reason"]))
    assert reasons == {
        "00000": Reason.MISSING_FILE, "stray": Reason.NOT_IN_MANIFEST, "00001": Reason.EMPTY_FILE,
        "00002": Reason.NOT_AN_IMAGE, "00003": Reason.CORRUPT_IMAGE, "00004": Reason.WRONG_SIZE,
        "00009": Reason.DUPLICATE, "00015": Reason.CONFLICTING_DUPLICATE, "00016": Reason.CONFLICTING_DUPLICATE,
        "00011": Reason.MISSING_LABEL, "00012": Reason.UNKNOWN_LABEL, "00013": Reason.DUPLICATE_ID,
    }
    assert "truncated" in quarantine.set_index("id").loc["00003", "detail"].lower()
    assert "32x32" in quarantine.set_index("id").loc["00004", "detail"]
    # converted images are kept, with their pixels intact
    assert report.converted == 2
    pixels, labels = to_arrays(clean.set_index("id").loc[["00005", "00006"]].reset_index())
    np.testing.assert_array_equal(pixels, IMAGES[[5, 6]])
    # nothing is lost: clean + quarantined == input, row for row
    assert len(clean) + len(quarantine) == len(raw) == 22
    assert set(clean["id"]) | set(quarantine["id"]) == set(raw["id"])
    assert report.by_reason[Reason.CONFLICTING_DUPLICATE] == 2
    assert report.by_reason[Reason.DUPLICATE_ID] == 2  # both rows: neither label can be trusted
    assert len(clean) == 9


def test_wrong_size_is_resized_when_configured(corrupted: Path) -> None:
    raw = raw_table_from_dir(corrupted)
    clean, quarantine, report = clean_table(raw, CleanConfig(resize_wrong_size=True))
    assert "00004" in set(clean["id"]) and "00004" not in set(quarantine["id"])
    assert report.resized == 1
    assert {"id": "00004", "path": "images/00004.png", "fix": "resized",
            "detail": "32x32 -> 28x28 (Lanczos)"} in report.repairs


def test_run_clean_writes_tables_and_markdown(corrupted: Path, tmp_path: Path) -> None:
    raw_path = write_table(raw_table_from_dir(corrupted), tmp_path / "raw.parquet")
    report = run_clean(raw_path, tmp_path / "clean.parquet", tmp_path / "q.csv", summary_path=tmp_path / "s.md",
                       repairs_path=tmp_path / "r.csv")
    repairs = pd.read_csv(tmp_path / "r.csv", dtype=str)
    assert list(repairs.columns) == ["id", "path", "fix", "detail"]
    assert sorted(repairs["id"]) == ["00005", "00006"] and set(repairs["fix"]) == {"grayscale"}
    assert repairs.set_index("id").loc["00006", "detail"] == "RGBA -> L (alpha composited on black)"
    quarantine = pd.read_csv(tmp_path / "q.csv")
    assert list(quarantine.columns) == ["id", "path", "reason", "detail"]
    assert len(quarantine) == report.n_quarantined == 13
    summary = (tmp_path / "s.md").read_text()
    assert "| corrupt_image | 1 |" in summary and "| conflicting_duplicate | 2 |" in summary


DAMAGE = st.sampled_from(["ok", "missing", "empty", "garbage", "truncated", "big", "nolabel", "badlabel", "dup", "conflict"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(DAMAGE, min_size=1, max_size=20), strays=st.integers(0, 3))
def test_clean_plus_quarantine_equals_input(damage: list[str], strays: int) -> None:
    """Property: on any generated corrupted corpus, every input row is clean or quarantined, once."""
    records = []
    for i, kind in enumerate(damage):
        image = IMAGES[i % len(IMAGES)]
        label = str(LABELS[i % len(LABELS)])
        png = encode_png(image)
        if kind == "missing":
            png = None
        elif kind == "empty":
            png = b""
        elif kind == "garbage":
            png = bytes(range(i, i + 40))
        elif kind == "truncated":
            png = png[: len(png) // 3]
        elif kind == "big":
            png = png_bytes(Image.new("L", (29, 28)))
        elif kind == "nolabel":
            label = None
        elif kind == "badlabel":
            label = "11"
        elif kind in ("dup", "conflict") and records:
            png = records[0]["png"] or encode_png(IMAGES[0])
            label = records[0]["label"] if kind == "dup" else "x"
        records.append({"id": f"{i:03d}", "label": label, "path": f"images/{i:03d}.png", "png": png, "in_manifest": True})
    for j in range(strays):
        records.append({"id": f"s{j}", "label": None, "path": f"images/s{j}.png", "png": encode_png(IMAGES[j]), "in_manifest": False})
    raw = pd.DataFrame.from_records(records)
    clean, quarantine, report = clean_table(raw)
    assert len(clean) + len(quarantine) == len(raw)
    assert sorted([*clean["id"], *quarantine["id"]]) == sorted(raw["id"])
    assert clean["sha256"].is_unique
    assert set(quarantine["reason"]) <= {r.value for r in Reason}
