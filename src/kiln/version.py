"""The kiln code version: what a pipeline's cache key must change with.

Kubeflow's cache key holds a step's inputs, its image string and its component source,
not the ``kiln`` package the step calls into. So the code version goes into the image
tag: a cluster image is tagged with the kiln commit it was built from; a local run
(``kfp.local``, where the "image" is this venv) uses a hash of the package source.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import kiln


def source_hash(package_dir: Path | None = None) -> str:
    """sha256 (12 hex) over the relative path and bytes of every ``.py`` file of the kiln package."""
    root = package_dir or Path(kiln.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def image_with_tag(image: str, tag: str) -> str:
    """``image`` with its tag (or digest) replaced by ``tag``: ``reg:5000/kiln:0.1.0`` -> ``reg:5000/kiln:<tag>``."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        raise ValueError(f"{tag!r} is not a valid image tag")
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return f"{name}:{tag}"


def local_image(image: str) -> str:
    """The image string of a local run: ``image`` tagged ``src-<source hash>``, so a
    change of the kiln source misses kfp.local's cache while an unchanged one hits it."""
    return image_with_tag(image, f"src-{source_hash()}")
