"""Clean: decode every ingested image and account for each one.

Every row of the raw table ends up either in the clean table or in the quarantine
list with a reason code and a human-readable detail, so that
``len(clean) + len(quarantine) == len(raw)`` always holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from kiln.contract import CLASS_LABELS, IMAGE_SIZE
from kiln.dataset import CLEAN_COLUMNS, RAW_COLUMNS, read_table, write_table


class Reason(StrEnum):
    """Why a row was quarantined."""

    MISSING_FILE = "missing_file"  # listed in the manifest, no file
    NOT_IN_MANIFEST = "not_in_manifest"  # file present, manifest does not list it
    DUPLICATE_ID = "duplicate_id"  # the manifest lists the same id more than once
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT_IMAGE = "corrupt_image"  # recognised as an image but fails to decode (e.g. truncated)
    WRONG_SIZE = "wrong_size"
    MISSING_LABEL = "missing_label"
    UNKNOWN_LABEL = "unknown_label"
    DUPLICATE = "duplicate"  # same pixels and label as a kept image
    CONFLICTING_DUPLICATE = "conflicting_duplicate"  # same pixels, different labels: all dropped


QUARANTINE_COLUMNS = ("id", "path", "reason", "detail")
REPAIR_COLUMNS = ("id", "path", "fix", "detail")
"""One row per change cleaning made to an image it kept: ``fix`` is ``grayscale`` or ``resized``."""


@dataclass(frozen=True)
class CleanConfig:
    """Cleaning rules.

    resize_wrong_size: resize images that are not IMAGE_SIZE x IMAGE_SIZE (Lanczos)
        instead of quarantining them as ``wrong_size``.
    labels: the accepted label strings, in class-index order.
    """

    resize_wrong_size: bool = False
    labels: tuple[str, ...] = CLASS_LABELS


@dataclass
class CleanReport:
    """Counts of what cleaning did; ``converted`` counts kept colour/alpha images made
    grayscale, ``resized`` kept images resized to 28x28 (each listed in the repairs table)."""

    n_input: int
    n_clean: int
    n_quarantined: int
    by_reason: dict[str, int] = field(default_factory=dict)
    converted: int = 0
    resized: int = 0
    repairs: list[dict[str, str]] = field(default_factory=list)

    def markdown(self) -> str:
        """A Markdown summary: totals, then one row per quarantine reason."""
        lines = [
            "# Cleaning summary",
            "",
            f"- input rows: {self.n_input}",
            f"- clean images: {self.n_clean}",
            f"- quarantined: {self.n_quarantined}",
            f"- converted to grayscale: {self.converted}",
            f"- resized: {self.resized}",
            "",
            "| reason | count |",
            "|---|---|",
        ]
        lines += [f"| {reason} | {count} |" for reason, count in sorted(self.by_reason.items())] or ["| (none) | 0 |"]
        return "\n".join(lines) + "\n"


class _Rejected(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def decode_image(png: bytes, config: CleanConfig) -> tuple[np.ndarray, dict[str, str]]:
    """Decode image bytes to uint8 [28, 28]; returns (pixels, fixes), where ``fixes``
    maps ``grayscale`` / ``resized`` to what was changed (e.g. ``RGBA -> L``).

    Raises ``_Rejected`` with the reason when the bytes cannot become a valid image.
    """
    if len(png) == 0:
        raise _Rejected(Reason.EMPTY_FILE, "file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(png))
    except UnidentifiedImageError as e:
        raise _Rejected(Reason.NOT_AN_IMAGE, f"not a recognised image format ({len(png)} bytes)") from e
    except Exception as e:  # Pillow raises many types for hostile headers
        raise _Rejected(Reason.CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from e
    try:
        image.load()
    except Exception as e:  # truncated data, bad CRC, broken zlib stream...
        raise _Rejected(Reason.CORRUPT_IMAGE, f"{image.format} fails to decode: {type(e).__name__}: {e}") from e

    fixes: dict[str, str] = {}
    if image.mode != "L":
        fixes["grayscale"] = f"{image.mode} -> L" + (" (alpha composited on black)" if "A" in image.getbands()
                                                       or "transparency" in image.info else "")
        if "A" in image.getbands() or "transparency" in image.info:
            # Composite on black: MNIST is light ink on a black background.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("L")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        if not config.resize_wrong_size:
            raise _Rejected(Reason.WRONG_SIZE, f"{image.size[0]}x{image.size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        fixes["resized"] = f"{image.size[0]}x{image.size[1]} -> {IMAGE_SIZE}x{IMAGE_SIZE} (Lanczos)"
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8), fixes


def clean_table(raw: pd.DataFrame, config: CleanConfig = CleanConfig()) -> tuple[pd.DataFrame, pd.DataFrame, CleanReport]:
    """Split a raw table into (clean table, quarantine table, report); ``report.repairs``
    lists (as :data:`REPAIR_COLUMNS` rows) every change made to a kept image.

    Order of checks per row: manifest membership, file presence, decodability, size,
    label (:func:`screen_rows`); then, across rows, exact duplicates by pixel content
    (:func:`resolve_duplicates`). A sharded run does the first per shard and the second
    once over every shard's survivors, with the same result.
    """
    kept, rejected = screen_rows(raw, config)
    return resolve_duplicates(kept, rejected)


SCREENED_COLUMNS = ("ordinal", "id", "label", "pixels", "sha256", "path", "fixes")
"""What :func:`screen_rows` keeps per image: its raw-table position (``ordinal``), the clean
columns, its path and the JSON of the fixes made to it (``{"grayscale": "RGBA -> L"}``)."""
REJECTED_COLUMNS = ("ordinal", *QUARANTINE_COLUMNS)


def screen_rows(raw: pd.DataFrame, config: CleanConfig = CleanConfig()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-row checks of :func:`clean_table`: (kept, rejected) with SCREENED_COLUMNS and
    REJECTED_COLUMNS. ``ordinal`` is the raw table's own ``ordinal`` column when it has one
    (a shard of a larger table), else the row position. Manifest ids are counted within
    ``raw``, so a shard must hold every row of an id (shards split by id)."""
    ordinals = raw["ordinal"].tolist() if "ordinal" in raw.columns else list(range(len(raw)))
    label_index = {label: i for i, label in enumerate(config.labels)}
    rejected: list[dict[str, object]] = []
    kept: list[dict[str, object]] = []
    id_counts = Counter(raw.loc[raw["in_manifest"], "id"])

    def reject(ordinal: int, row, reason: Reason, detail: str) -> None:
        rejected.append({"ordinal": ordinal, "id": str(row.id), "path": str(row.path), "reason": reason.value,
                         "detail": detail})

    for ordinal, row in zip(ordinals, raw.itertuples(index=False)):
        if not row.in_manifest:
            reject(ordinal, row, Reason.NOT_IN_MANIFEST, "image file has no row in the manifest")
            continue
        if id_counts[row.id] > 1:
            reject(ordinal, row, Reason.DUPLICATE_ID, f"the manifest lists id {row.id!r} {id_counts[row.id]} times")
            continue
        if row.png is None or (isinstance(row.png, float) and np.isnan(row.png)):
            reject(ordinal, row, Reason.MISSING_FILE, "listed in the manifest but the file does not exist")
            continue
        try:
            pixels, fixes = decode_image(bytes(row.png), config)
        except _Rejected as r:
            reject(ordinal, row, r.reason, r.detail)
            continue
        label = row.label if isinstance(row.label, str) else None
        if label is None:
            reject(ordinal, row, Reason.MISSING_LABEL, "the manifest gives no label")
            continue
        if label not in label_index:
            reject(ordinal, row, Reason.UNKNOWN_LABEL, f"label {label!r} is not one of {list(config.labels)}")
            continue
        data = pixels.tobytes()
        kept.append({"ordinal": ordinal, "id": str(row.id), "label": label_index[label], "pixels": data,
                     "sha256": hashlib.sha256(data).hexdigest(), "path": str(row.path),
                     "fixes": json.dumps(fixes, sort_keys=True)})
    kept_df = pd.DataFrame.from_records(kept, columns=list(SCREENED_COLUMNS))
    kept_df = kept_df.astype({"ordinal": "int64", "id": "string", "label": "int64", "sha256": "string",
                              "path": "string", "fixes": "string"})
    return kept_df, pd.DataFrame.from_records(rejected, columns=list(REJECTED_COLUMNS)).astype({"ordinal": "int64"})


def resolve_duplicates(kept: pd.DataFrame, rejected: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, CleanReport]:
    """The cross-row step of :func:`clean_table` over screened rows (from one table or
    many shards' concatenated): of images with identical pixels keep the first (by
    ``ordinal``) of a same-label group and drop every one of a conflicting group. Returns
    (clean table sorted by id, quarantine in raw order then duplicates, report)."""
    kept = kept.sort_values("ordinal", kind="stable")
    rejected = rejected.sort_values("ordinal", kind="stable")
    quarantine = rejected[list(QUARANTINE_COLUMNS)].to_dict("records")
    by_hash: dict[str, list[dict[str, object]]] = {}
    for record in kept.to_dict("records"):
        by_hash.setdefault(str(record["sha256"]), []).append(record)
    clean_records = []
    for group in by_hash.values():
        labels = {r["label"] for r in group}
        if len(labels) > 1:
            ids = ", ".join(str(r["id"]) for r in group)
            for r in group:
                quarantine.append({"id": str(r["id"]), "path": str(r["path"]), "reason": Reason.CONFLICTING_DUPLICATE.value,
                                   "detail": f"identical pixels with different labels {sorted(labels)}: {ids}"})
            continue
        first, *rest = group
        clean_records.append(first)
        for r in rest:
            quarantine.append({"id": str(r["id"]), "path": str(r["path"]), "reason": Reason.DUPLICATE.value,
                               "detail": f"same pixels and label as {first['id']}"})

    clean_records.sort(key=lambda r: str(r["id"]))
    fixes = [json.loads(str(r["fixes"])) for r in clean_records]
    repairs = [{"id": str(r["id"]), "path": str(r["path"]), "fix": fix, "detail": detail}
               for r, made in zip(clean_records, fixes) for fix, detail in made.items()]
    clean = pd.DataFrame.from_records(clean_records, columns=list(SCREENED_COLUMNS))[list(CLEAN_COLUMNS)]
    clean = clean.astype({"id": "string", "label": "int64", "sha256": "string"})
    quarantined = pd.DataFrame.from_records(quarantine, columns=list(QUARANTINE_COLUMNS))
    report = CleanReport(
        n_input=len(kept) + len(rejected),
        n_clean=len(clean),
        n_quarantined=len(quarantined),
        by_reason=dict(Counter(quarantined["reason"])),
        converted=sum("grayscale" in made for made in fixes),
        resized=sum("resized" in made for made in fixes),
        repairs=repairs,
    )
    if report.n_clean + report.n_quarantined != report.n_input:  # the invariant the stage exists for
        raise AssertionError(f"cleaning lost rows: {report}")
    return clean, quarantined, report


def run_clean(raw_path: str | Path, clean_path: str | Path, quarantine_path: str | Path,
              config: CleanConfig = CleanConfig(), summary_path: str | Path | None = None,
              repairs_path: str | Path | None = None) -> CleanReport:
    """File-level wrapper: raw Parquet in; clean Parquet, quarantine CSV, Markdown summary
    and repairs CSV (:data:`REPAIR_COLUMNS`) out."""
    raw = read_table(raw_path, RAW_COLUMNS)
    clean, quarantined, report = clean_table(raw, config)
    write_table(clean, clean_path)
    Path(quarantine_path).parent.mkdir(parents=True, exist_ok=True)
    quarantined.to_csv(quarantine_path, index=False)
    if summary_path is not None:
        Path(summary_path).write_text(report.markdown())
    if repairs_path is not None:
        Path(repairs_path).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame.from_records(report.repairs, columns=list(REPAIR_COLUMNS)).to_csv(repairs_path, index=False)
    return report
