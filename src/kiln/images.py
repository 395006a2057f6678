"""The image file (``images.toml`` at the repository root): kiln's container images,
their tags and the pinned base images they are built from.

``python -m kiln.images commands`` prints the ``docker build`` (and, with ``--push``,
``docker push``) commands that ``make images`` runs; ``python -m kiln.images ref NAME``
prints one image's reference. Standard library only, so it runs before any install.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

IMAGES_FILE = "images.toml"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImagesError(ValueError):
    """The image file is missing, malformed, or has no such image."""


@dataclass(frozen=True)
class Image:
    """One image to build: its reference, Dockerfile, pinned base and build arguments."""

    key: str
    ref: str
    dockerfile: str
    base_ref: str
    build_args: dict[str, str]

    def build_command(self) -> list[str]:
        args = ["docker", "build", "-f", self.dockerfile, "-t", self.ref,
                "--build-arg", f"BASE_IMAGE={self.base_ref}"]
        for key, value in sorted(self.build_args.items()):
            args += ["--build-arg", f"{key}={value}"]
        return [*args, "."]


def default_path() -> Path:
    """``images.toml`` of the repository this module is in (src/kiln/ -> root)."""
    return Path(__file__).resolve().parents[2] / IMAGES_FILE


def load(path: str | Path | None = None) -> dict:
    """The parsed image file, its base digests checked (``sha256:`` + 64 hex digits)."""
    path = Path(path) if path else default_path()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ImagesError(f"cannot read {path}: {e}") from e
    for name, base in data.get("bases", {}).items():
        if not DIGEST_RE.match(str(base.get("digest", ""))):
            raise ImagesError(f"{path}: base {name!r} digest {base.get('digest')!r} is not sha256:<64 hex>")
    return data


def images(path: str | Path | None = None) -> dict[str, Image]:
    """Every image of the file by key (steps, train, serve, serve-cuda)."""
    data = load(path)
    out = {}
    for key, spec in data["images"].items():
        base = data["bases"].get(spec["base"])
        if base is None:
            raise ImagesError(f"image {key!r} names unknown base {spec['base']!r}")
        out[key] = Image(key=key, ref=f"{data['registry']}/{spec['name']}:{data['tag']}",
                         dockerfile=spec["dockerfile"], base_ref=f"{base['image']}@{base['digest']}",
                         build_args={k: str(v) for k, v in spec.get("build_args", {}).items()})
    return out


def image_ref(key: str, path: str | Path | None = None) -> str:
    """``registry/name:tag`` of one image, e.g. ``image_ref("steps")``."""
    found = images(path)
    if key not in found:
        raise ImagesError(f"no image {key!r} in the image file (it has {', '.join(sorted(found))})")
    return found[key].ref


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.images", description=__doc__)
    parser.add_argument("--file", default=None, help="the image file (default: the repository's images.toml)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    commands = sub.add_parser("commands", help="print the docker commands that build (and push) every image")
    commands.add_argument("--push", action="store_true")
    commands.add_argument("--git-commit", default="unknown", help="baked into the images as KILN_GIT_COMMIT")
    ref = sub.add_parser("ref", help="print one image's reference")
    ref.add_argument("key")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "ref":
            print(image_ref(args.key, args.file))
            return 0
        for image in images(args.file).values():
            cmd = image.build_command()
            cmd[-1:-1] = ["--build-arg", f"GIT_COMMIT={args.git_commit}"]
            print(shlex.join(cmd))
            if args.push:
                print(shlex.join(["docker", "push", image.ref]))
    except ImagesError as e:
        print(f"kiln.images: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
