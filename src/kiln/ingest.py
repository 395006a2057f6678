"""Ingest: resolve a data revision, then read ``data/`` from a DVC repository into a raw table.

``data_repo`` is anything DVC accepts (a local path or a git URL); ``data_rev`` a git
revision (tag, branch, commit) or empty: for a local checkout the workspace, for a URL
the default branch. Files come through ``dvc.api.DVCFileSystem``, so they are read from
the DVC cache or pulled from the default remote when the cache lacks them.

:func:`resolve` pins a revision to (commit, data version) without reading any data; it
is cheap, so the pipeline runs it on every run (uncached) and hands its result to the
cached :func:`ingest`: new data means new ingest inputs, hence a cache miss.

A private ``data_repo`` over https takes its credentials from ``KILN_GIT_USERNAME`` and
``KILN_GIT_PASSWORD`` (a Kubernetes basic-auth Secret on a cluster).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pandas as pd

from kiln.data import IMAGES, MANIFEST
from kiln.dataset import RAW_COLUMNS, read_table, write_table

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """The repository, revision or dataset cannot be read."""


@dataclass(frozen=True)
class IngestResult:
    """What ingest read: the DVC md5 of ``data/`` (the data version) and row counts."""

    data_version: str
    n_rows: int
    n_manifest: int
    n_files: int


@dataclass(frozen=True)
class ResolvedData:
    """A data revision pinned: the git commit ("" = a local workspace) and the data version."""

    commit: str
    data_version: str


USERNAME_ENV, PASSWORD_ENV = "KILN_GIT_USERNAME", "KILN_GIT_PASSWORD"


def with_credentials(data_repo: str) -> str:
    """``data_repo`` with the credentials of USERNAME_ENV/PASSWORD_ENV put into an
    https URL; anything else (no credentials, a path, ssh, a URL that has some) unchanged."""
    password = os.environ.get(PASSWORD_ENV)
    parts = urlsplit(data_repo)
    if not password or parts.scheme not in ("https", "http") or "@" in parts.netloc:
        return data_repo
    user = quote(os.environ.get(USERNAME_ENV) or "git", safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc}"))


def _redact(text: str) -> str:
    """``text`` without the git password, so errors and logs never carry it."""
    password = os.environ.get(PASSWORD_ENV)
    for secret in {password, quote(password or "", safe="")} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def _dvc_errors() -> tuple[type[BaseException], ...]:
    """What DVC raises for a bad repo, revision, or data missing from cache and remote."""
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexDirError
    from scmrepo.exceptions import SCMError

    return DvcException, SCMError, DataIndexDirError, OSError


def _open(data_repo: str, data_rev: str, data_path: str):
    """(DVCFileSystem at the revision, the DVC md5 of ``data_path`` without ``.dir``)."""
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(with_credentials(data_repo), rev=data_rev or None)
        info = fs.info(data_path)
    except _dvc_errors() as e:
        raise IngestError(_redact(f"cannot open {data_path!r} in {data_repo!r} at rev "
                                  f"{data_rev or '<default>'}: {e}")) from e
    md5 = info.get("md5") or (info.get("dvc_info") or {}).get("md5")
    if not md5:
        raise IngestError(f"{data_path!r} in {data_repo!r} is not tracked by DVC (no md5); run `dvc add {data_path}`")
    return fs, md5.removesuffix(".dir")


def _is_workspace(data_repo: str, data_rev: str) -> bool:
    return not data_rev and Path(data_repo).is_dir()


def content_fingerprint(root: Path) -> str:
    """sha256 over every file's relative path and bytes under ``root`` (sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _workspace_version(data_repo: str, data_path: str, md5: str) -> str:
    """``md5``, or for uncommitted changes ``md5+dirty.<content hash>``: the files' own
    hash, so different edits are different versions (and different cache keys)."""
    if not _workspace_is_dirty(data_repo, data_path):
        return md5
    log.warning("workspace %s differs from %s.dvc: recording data version as dirty", data_repo, data_path)
    return f"{md5}+dirty.{content_fingerprint(Path(data_repo) / data_path)[:12]}"


def resolve(data_repo: str, data_rev: str, data_path: str = "data") -> ResolvedData:
    """Pin ``data_rev`` of ``data_repo``: its commit and the md5 DVC records for
    ``data_path`` there, read from the ``.dvc`` file (no data is downloaded).

    "" is the workspace of a local checkout (commit "") and the default branch of a
    URL; a branch or tag resolves to the commit it points at now.
    """
    fs, md5 = _open(data_repo, data_rev, data_path)
    if _is_workspace(data_repo, data_rev):
        return ResolvedData("", _workspace_version(data_repo, data_path, md5))
    return ResolvedData(fs.repo.get_rev(), md5)


def _read_manifest(text: str) -> list[tuple[str, str | None]]:
    """Rows of ``labels.csv`` as (id, label-or-None); the header must be ``id,label``."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["id", "label"]:
        raise IngestError(f"{MANIFEST}: header must start with 'id,label', got {header}")
    rows: list[tuple[str, str | None]] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or not row[0].strip():
            raise IngestError(f"{MANIFEST}:{line_no}: row without an id: {row}")
        label = row[1].strip() if len(row) > 1 and row[1].strip() else None
        rows.append((row[0].strip(), label))
    return rows


def _workspace_is_dirty(repo: str, data_path: str) -> bool:
    """True when the workspace copy of ``data_path`` differs from its ``.dvc`` file."""
    from dvc.repo import Repo

    with Repo(repo) as dvc_repo:
        return bool(dvc_repo.status(targets=[str(Path(repo).resolve() / f"{data_path}.dvc")]))


def listing_rows(manifest: list[tuple[str, str | None]], file_names: list[str]) -> list[dict[str, Any]]:
    """The raw table's rows without image bytes: every manifest row, then every file of
    ``images/`` (names, sorted) the manifest does not list; ``file`` is the image's file
    name, None when the manifest lists an id without one."""
    files = {Path(name).stem: name for name in sorted(file_names)}
    rows: list[dict[str, Any]] = []
    listed = set()
    for image_id, label in manifest:
        listed.add(image_id)
        name = files.get(image_id)
        rows.append({"id": image_id, "label": label, "path": f"{IMAGES}/{name or image_id + '.png'}", "file": name,
                     "in_manifest": True})
    for image_id, name in files.items():
        if image_id not in listed:
            rows.append({"id": image_id, "label": None, "path": f"{IMAGES}/{name}", "file": name, "in_manifest": False})
    return rows


def raw_table(rows: list[dict[str, Any]], read: Any) -> pd.DataFrame:
    """The raw table (see ``kiln.dataset``) of :func:`listing_rows`, each image's bytes from
    ``read(file name)``; extra keys of the rows (a shard plan's ``ordinal``) stay as columns."""
    records = [{**{k: v for k, v in row.items() if k != "file"},
                "png": read(row["file"]) if row["file"] is not None else None} for row in rows]
    extra = [k for k in (rows[0] if rows else {}) if k not in (*RAW_COLUMNS, "file")]
    df = pd.DataFrame.from_records(records, columns=[*RAW_COLUMNS, *extra])
    return df.astype({"id": "string", "label": "string", "path": "string", "in_manifest": bool})


def raw_table_from_dir(root: Path) -> pd.DataFrame:
    """Build the raw table (see ``kiln.dataset``) from a dataset folder on disk.

    Every manifest row and every file under ``images/`` gets exactly one row, so the
    cleaning stage can account for all of them.
    """
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise IngestError(f"no {MANIFEST} in {root}")
    manifest = _read_manifest(manifest_path.read_text())
    image_dir = root / IMAGES
    names = [p.name for p in image_dir.glob("*") if p.is_file()] if image_dir.is_dir() else []
    return raw_table(listing_rows(manifest, names), lambda name: (image_dir / name).read_bytes())


def _remote_of(fs: Any) -> str:
    """`` from DVC remote 'name' (url)`` of the repository ``fs`` reads, or "" if unknown."""
    try:
        config = fs.repo.config
        name = config["core"]["remote"]
        return f" via DVC remote {name!r} ({config['remote'][name]['url']})"
    except (AttributeError, KeyError, TypeError):
        return ""


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception behind ``error`` (DVC wraps S3's own
    errors, e.g. an unreachable endpoint or a rejected key, in "failed to load directory")."""
    seen = [error]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    lines = [line for e in reversed(seen) for line in str(e).splitlines()[:1] if line.strip()]
    return f"{type(seen[-1]).__name__}: {lines[0]}" if lines else type(seen[-1]).__name__


def open_data(data_repo: str, data_rev: str, data_path: str = "data",
              expected_version: str | None = None) -> tuple[Any, str]:
    """(DVCFileSystem of ``data_repo`` at ``data_rev``, the data version of ``data_path``).

    The data version is the md5 DVC records for ``data_path`` at that revision; for a
    workspace read whose files differ from the ``.dvc`` file it is marked dirty (see
    :func:`resolve`) so a model is never attributed to data it was not trained on. With
    ``expected_version`` (what :func:`resolve` saw), other data fails instead of being
    recorded under the wrong version.
    """
    fs, md5 = _open(data_repo, data_rev, data_path)
    data_version = _workspace_version(data_repo, data_path, md5) if _is_workspace(data_repo, data_rev) else md5
    if expected_version is not None and data_version != expected_version:
        raise IngestError(f"{data_path!r} in {data_repo!r} at {data_rev or '<workspace>'} is version {data_version}, "
                          f"but {expected_version} was resolved: the data changed during the run; start it again")
    return fs, data_version


def list_data(fs: Any, data_path: str = "data") -> list[dict[str, Any]]:
    """:func:`listing_rows` of ``data_path`` as ``fs`` sees it: the manifest is read, the
    images are only listed (DVC reads the directory's listing, not the files)."""
    try:
        manifest = fs.cat_file(f"{data_path}/{MANIFEST}").decode()
    except FileNotFoundError as e:
        raise IngestError(f"no {MANIFEST} in {data_path!r}") from e
    except _dvc_errors() as e:
        raise IngestError(_redact(f"cannot read {data_path}/{MANIFEST}{_remote_of(fs)}: {_root_cause(e)}")) from e
    image_dir = f"{data_path}/{IMAGES}"
    entries = fs.ls(image_dir, detail=True) if fs.isdir(image_dir) else []
    names = [Path(e["name"]).name for e in entries if e.get("type") == "file"]
    return listing_rows(_read_manifest(manifest), names)


def fetch_images(fs: Any, names: list[str], data_path: str = "data", where: str = "") -> dict[str, bytes]:
    """The bytes of the images ``names`` (file names under ``images/``), fetched in one
    batch (DVC pulls what its cache lacks from the remote); ``where`` names the source in errors."""
    with tempfile.TemporaryDirectory(prefix="kiln-fetch-") as tmp:
        local = [str(Path(tmp) / name) for name in names]
        try:
            if names:
                fs.get([f"{data_path}/{IMAGES}/{name}" for name in names], local)
        except _dvc_errors() as e:
            raise IngestError(_redact(f"cannot fetch {len(names)} images of {data_path!r}{where}"
                                      f"{_remote_of(fs)}: {_root_cause(e)}")) from e
        return {name: Path(path).read_bytes() for name, path in zip(names, local)}


def ingest(data_repo: str, data_rev: str, out_path: str | Path, data_path: str = "data",
           expected_version: str | None = None) -> IngestResult:
    """Read ``data_path`` of ``data_repo`` at ``data_rev`` into a raw table at ``out_path``
    (the data version and ``expected_version`` as in :func:`open_data`)."""
    fs, data_version = open_data(data_repo, data_rev, data_path, expected_version)
    with tempfile.TemporaryDirectory(prefix="kiln-ingest-") as tmp:
        try:
            fs.get(data_path, tmp, recursive=True)
        except _dvc_errors() as e:
            raise IngestError(_redact(f"cannot fetch {data_path!r} from {data_repo!r} at {data_rev or '<default>'}"
                                      f"{_remote_of(fs)}: {_root_cause(e)}")) from e
        root = Path(tmp) / Path(data_path).name
        df = raw_table_from_dir(root if root.is_dir() else Path(tmp))
    write_table(df, out_path)
    return IngestResult(
        data_version=data_version,
        n_rows=len(df),
        n_manifest=int(df["in_manifest"].sum()),
        n_files=int(df["png"].notna().sum()),
    )


# --------------------------------------------------------------------------- shard plan

PLAN_COLUMNS = ("id", "label", "path", "file", "in_manifest", "ordinal", "shard")
"""One row per raw-table row: what ingest would read, without the bytes, plus the row's
position (``ordinal``) and its shard; ``file`` is the image's file name (null: none)."""


@dataclass(frozen=True)
class ShardPlan:
    """What :func:`plan_shards` wrote: the data version, and the rows per shard."""

    data_version: str
    rows_per_shard: tuple[int, ...]

    @property
    def shards(self) -> list[int]:
        """The shard numbers, the list the pipeline's ParallelFor runs over."""
        return list(range(len(self.rows_per_shard)))


def shard_of(image_id: str, shards: int) -> int:
    """The shard of ``image_id``: sha256 of the id, modulo ``shards``. It depends on the
    id alone, so an image stays in its shard as the data set grows."""
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") % shards


def plan_shards(data_repo: str, data_commit: str, plan_path: str | Path, shards: int, data_path: str = "data",
                expected_version: str | None = None) -> ShardPlan:
    """Write the shard plan (:data:`PLAN_COLUMNS`, Parquet) of ``data_path`` of ``data_repo``
    at ``data_commit`` ("" = a local workspace); no image is read."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    fs, data_version = open_data(data_repo, data_commit, data_path, expected_version)
    plan = pd.DataFrame.from_records(list_data(fs, data_path), columns=list(PLAN_COLUMNS[:5]))
    plan["ordinal"] = range(len(plan))
    plan["shard"] = [shard_of(i, shards) for i in plan["id"]]
    plan = plan.astype({"id": "string", "label": "string", "path": "string", "file": "string",
                        "in_manifest": bool, "ordinal": "int64", "shard": "int64"})
    write_table(plan, plan_path)
    counts = plan["shard"].value_counts()
    return ShardPlan(data_version, tuple(int(counts.get(s, 0)) for s in range(shards)))


def fetch_shard(plan_path: str | Path, shard: int, data_repo: str, data_commit: str,
                data_path: str = "data") -> pd.DataFrame:
    """The raw table (with ``ordinal``) of one shard of the plan at ``plan_path``: its rows,
    with the bytes of its files fetched from ``data_repo`` at ``data_commit``."""
    plan = read_table(plan_path, PLAN_COLUMNS)
    rows = plan[plan["shard"] == shard].drop(columns="shard")
    names = [str(name) for name in rows["file"].dropna()]
    images = {}
    if names:
        fs, _ = open_data(data_repo, data_commit, data_path)
        images = fetch_images(fs, names, data_path, where=f" (shard {shard}) of {data_repo!r} at "
                                                          f"{data_commit or '<workspace>'}")
    records = [{**row, "file": None if pd.isna(row["file"]) else row["file"]} for row in rows.to_dict("records")]
    return raw_table(records, images.__getitem__)
