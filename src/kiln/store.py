"""A versioned model store on a filesystem (a local folder or a mounted volume).

Layout::

    <root>/<model>/<version>/model.onnx
    <root>/<model>/<version>/model.json     # lineage: sha256, data version, git commit, params, metrics
    <root>/<model>/<version>/model.int8.onnx  # shipped variants, each listed (file, sha256) under "variants"
    <root>/<model>/production               # text file holding the production version
    <root>/<model>/config.pbtxt             # Triton model configuration (see below)

Versions are positive integers assigned in order (as KServe/Triton expect). Aliases are
small text files replaced with ``os.replace``, so a reader sees the old version or the
new one, never a half-written alias; a version directory is complete before its alias
can point at it (it is written under a temporary name and renamed into place).

Everything is readable by every uid (folders 0755, files 0644, whatever the writer's
umask), since the readers are other processes: a server image, KServe's Triton runtime.

The store is also a Triton model repository: ``config.pbtxt`` describes the ONNX
contract and its ``version_policy`` names the production version only; it is rewritten
(atomically) whenever the ``production`` alias moves, so a Triton server polling the
repository (``--model-control-mode=poll``) serves what the alias says.

Every move of an alias is audited: the version it now points at gets a line (who,
when, from, to, why) appended under ``audit`` in its ``model.json``;
:meth:`ModelStore.history` collects them and :meth:`ModelStore.rollback_target` follows
them back. Moves are serialized by a lock on the model's folder, so two concurrent
promotions cannot interleave their alias and audit writes.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.contract import IMAGE_SIZE, INPUT_NAME, LABEL_NAME, NUM_CLASSES, PROBABILITIES_NAME
from kiln.errors import KilnError, StoreMissingError

MODEL_FILE = "model.onnx"
META_FILE = "model.json"
PRODUCTION = "production"
TRITON_CONFIG = "config.pbtxt"
TRITON_MAX_BATCH_SIZE = 64
DIR_MODE = 0o755
FILE_MODE = 0o644


class StoreError(KilnError, RuntimeError):
    """The store is missing, inconsistent, or asked for something that does not exist."""


def actor() -> str:
    """Who is moving an alias: ``KILN_ACTOR`` if set (a CI job, a pipeline run), else
    user@host."""
    if os.environ.get("KILN_ACTOR"):
        return os.environ["KILN_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_readable(path: Path) -> None:
    """Give a version folder (and what is in it) modes 0755/0644 whatever the umask.
    Entries another uid owns are left as they are (only their owner may chmod them)."""
    uid = os.getuid()
    for entry in (path, *path.rglob("*")):
        if entry.stat().st_uid == uid:
            entry.chmod(DIR_MODE if entry.is_dir() else FILE_MODE)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (mode 0644): readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def triton_config(model: str, version: str) -> str:
    """Triton's ``config.pbtxt`` for ``model`` (kiln's ONNX contract, see kiln.contract),
    serving only ``version``. ``label`` is [N] in the graph: a batched output of one
    value per row, declared as dims [1] reshaped to a scalar."""
    return f"""name: "{model}"
platform: "onnxruntime_onnx"
max_batch_size: {TRITON_MAX_BATCH_SIZE}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ {IMAGE_SIZE}, {IMAGE_SIZE} ] }}
]
output [
  {{ name: "{PROBABILITIES_NAME}" data_type: TYPE_FP32 dims: [ {NUM_CLASSES} ] }},
  {{ name: "{LABEL_NAME}" data_type: TYPE_INT64 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
version_policy: {{ specific: {{ versions: [ {int(version)} ] }} }}
dynamic_batching {{ }}
"""


@dataclass(frozen=True)
class ModelVersion:
    """One stored version: where its files are and what its ``model.json`` says."""

    model: str
    version: str
    path: Path
    meta: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def variants(self) -> list[str]:
        """Names of the reduced-precision variants stored with this version."""
        return sorted(self.meta.get("variants") or {})

    def model_file(self, variant: str = "") -> tuple[Path, str | None]:
        """(file, its sha256 from model.json) of the fp32 model (``variant`` "") or of a
        stored variant; StoreError when this version has no such variant."""
        if not variant:
            return self.onnx_path, self.meta.get("sha256")
        entry = (self.meta.get("variants") or {}).get(variant)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "/" in entry["file"]:
            raise StoreError(f"version {self.version} of {self.model!r} has no {variant!r} variant "
                             f"(it has {self.variants or 'none'})")
        return self.path / entry["file"], entry.get("sha256")


class ModelStore:
    """Read and write ``<root>/<model>/...`` as laid out in the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _model_dir(self, model: str) -> Path:
        if not model or "/" in model or model.startswith("."):
            raise StoreError(f"invalid model name: {model!r}")
        return self.root / model

    def versions(self, model: str) -> list[str]:
        """Stored versions of ``model``, oldest first (empty if none)."""
        d = self._model_dir(model)
        if not d.is_dir():
            return []
        return sorted((p.name for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=int)

    def models(self) -> list[str]:
        """Names of models that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def get(self, model: str, version: str) -> ModelVersion:
        """The stored ``version`` of ``model``; StoreError if absent or unreadable."""
        path = self._model_dir(model) / str(version)
        meta_path = path / META_FILE
        if not (path / MODEL_FILE).is_file() or not meta_path.is_file():
            raise StoreError(f"no version {version!r} of model {model!r} in {self.root}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"unreadable {meta_path}: {e}") from e
        return ModelVersion(model, str(version), path, meta)

    def alias(self, model: str, alias: str = PRODUCTION) -> str | None:
        """The version an alias points at, or None when the alias does not exist."""
        path = self._model_dir(model) / alias
        if not path.is_file():
            return None
        version = path.read_text().strip()
        if not version.isdigit():
            raise StoreError(f"alias {path} holds {version!r}, not a version number")
        return version

    def production(self, model: str) -> ModelVersion | None:
        """The production version of ``model``, or None when nothing is deployed."""
        version = self.alias(model, PRODUCTION)
        return None if version is None else self.get(model, version)

    def add_version(self, model: str, onnx_file: str | Path, meta: dict[str, Any],
                    variants: Mapping[str, tuple[str | Path, Mapping[str, Any]]] | None = None) -> ModelVersion:
        """Copy ``onnx_file`` in as the next version with ``meta`` (+ its sha256) as model.json.

        ``variants`` maps a variant name (``int8``...) to (its ONNX file, what to record
        about it); each is copied in as ``model.<name>.onnx`` and listed in model.json
        under ``variants`` with its file name and sha256.
        """
        model_dir = self._model_dir(model)
        model_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.root, model_dir):
            if d.stat().st_uid == os.getuid():
                d.chmod(DIR_MODE)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        try:
            shutil.copyfile(onnx_file, staging / MODEL_FILE)
            full_meta = {"created": utc_now(), **meta, "model": model, "sha256": sha256_file(staging / MODEL_FILE)}
            if variants:
                full_meta["variants"] = {}
                for name, (path, info) in sorted(variants.items()):
                    if not name.replace("_", "").isalnum():
                        raise StoreError(f"invalid variant name: {name!r}")
                    file = f"model.{name}.onnx"
                    shutil.copyfile(path, staging / file)
                    full_meta["variants"][name] = {**info, "file": file, "sha256": sha256_file(staging / file)}
            while True:
                existing = self.versions(model)
                version = str(int(existing[-1]) + 1 if existing else 1)
                full_meta["version"] = version
                (staging / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
                make_readable(staging)  # mkdtemp made it 0700
                try:
                    # rename fails if another writer took this number first: try the next.
                    os.rename(staging, model_dir / version)
                    break
                except OSError:
                    if not (model_dir / version).exists():
                        raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(model, version)

    def require(self, model: str) -> list[str]:
        """The versions of ``model``; StoreMissingError when the store or the model is absent."""
        if not self.root.is_dir():
            raise StoreMissingError(f"no model store at {self.root}: pass the right --store, or run `kiln run` "
                                    "to train and deploy a first model")
        versions = self.versions(model)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise StoreMissingError(f"no model {model!r} in the store {self.root} (models there: {known})")
        return versions

    def created(self, version: ModelVersion) -> str:
        """When ``version`` was stored (UTC, ISO 8601): from model.json, else its folder's mtime."""
        if isinstance(version.meta.get("created"), str):
            return version.meta["created"]
        mtime = version.path.stat().st_mtime
        return dt.datetime.fromtimestamp(mtime, dt.timezone.utc).isoformat(timespec="seconds")

    @contextmanager
    def _alias_lock(self, model: str) -> Iterator[None]:
        # The model folder itself is the lock (flock works on a directory's descriptor): no
        # lock file for Triton or a reader to trip over.
        fd = os.open(self._model_dir(model), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def set_alias(self, model: str, version: str, alias: str = PRODUCTION, reason: str = "",
                  who: str | None = None, action: str = "set") -> dict[str, Any] | None:
        """Point ``alias`` at an existing ``version``, atomically; return the audit entry
        appended to that version's model.json (None when the alias already pointed there).

        The version's files are made readable to all first (files added beside the model
        after :meth:`add_version`, like deploy's ``stats.parquet``, included). Moving
        ``production`` also rewrites the Triton ``config.pbtxt`` to serve that version.
        """
        target = self.get(model, version)  # refuse to point at something that is not there
        make_readable(target.path)
        model_dir = self._model_dir(model)
        with self._alias_lock(model):
            previous = self.alias(model, alias)
            write_atomically(model_dir / alias, f"{version}\n")
            if alias == PRODUCTION:
                write_atomically(model_dir / TRITON_CONFIG, triton_config(model, version))
            if previous == str(version):
                return None
            seq = max((int(e.get("seq", 0)) for e in self.history(model, alias)), default=0) + 1
            entry = {"seq": seq, "action": action, "alias": alias, "from": previous, "to": str(version),
                     "who": who or actor(), "when": utc_now(), "why": reason}
            meta = self.get(model, version).meta
            meta["audit"] = [*meta.get("audit", []), entry]
            write_atomically(target.path / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            return entry

    def history(self, model: str, alias: str = PRODUCTION) -> list[dict[str, Any]]:
        """Every audited move of ``alias``, oldest first (``seq`` counts them)."""
        entries = []
        for version in self.versions(model):
            try:
                audit = self.get(model, version).meta.get("audit", [])
            except StoreError:
                continue  # a half-deleted version has no say in the history
            entries.extend(e for e in audit if isinstance(e, dict) and e.get("alias") == alias)
        return sorted(entries, key=lambda e: (int(e.get("seq", 0)), str(e.get("when", ""))))

    def rollback_target(self, model: str, alias: str = PRODUCTION) -> str:
        """The version ``alias`` pointed at before it moved to where it is: the ``from`` of
        the last audited move onto the current version that was not itself a rollback (so
        rollbacks walk back through the promotions), else the newest older version."""
        current = self.alias(model, alias)
        if current is None:
            raise StoreError(f"{model!r} has no {alias!r} version to roll back from")
        for entry in reversed(self.history(model, alias)):
            if entry.get("action") == "rollback" or entry.get("to") != current:
                continue
            if entry.get("from") and entry["from"] in self.versions(model):
                return str(entry["from"])
        older = [v for v in self.versions(model) if int(v) < int(current)]
        if not older:
            raise StoreError(f"nothing to roll back to: version {current} of {model!r} is the oldest")
        return older[-1]
