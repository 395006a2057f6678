"""Deploy: put a blessed ONNX model into the model store and move ``production`` to it."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.provenance import git_commit
from kiln.store import ModelStore, ModelVersion, sha256_file

log = logging.getLogger(__name__)


def onnx_lineage(onnx_path: str | Path) -> dict[str, Any]:
    """The training parameters and class labels the export step wrote into the ONNX metadata."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    out: dict[str, Any] = {}
    for key, name in (("train_config", "parameters"), ("class_labels", "class_labels")):
        if key in props:
            out[name] = json.loads(props[key])
    return out


def stamp_metrics(onnx_path: str | Path, out_path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``onnx_path`` to ``out_path`` with ``metrics`` (JSON) added to its
    ``metadata_props`` under ``metrics``, so the served file carries the test metrics it
    was blessed on. Only metadata changes; the graph and weights are the evaluated ones."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    kept = [p for p in proto.metadata_props if p.key != "metrics"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key="metrics", value=json.dumps(metrics, sort_keys=True))
    onnx.save_model(proto, str(out_path), save_as_external_data=False)
    return Path(out_path)


def shipped_variants(variants_dir: str | Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The variants the export step shipped: ``{name: (file, record)}`` from
    ``variants_dir/variants.json`` (see :func:`kiln.export.export_variants`). Files are
    looked up by name inside ``variants_dir``, since the folder moves between steps."""
    variants_dir = Path(variants_dir)
    report_path = variants_dir / "variants.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"no variants.json in {variants_dir}")
    report = json.loads(report_path.read_text())
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name, entry in report.get("variants", {}).items():
        if not entry.get("ships"):
            continue
        path = variants_dir / Path(entry["path"]).name
        if not path.is_file():
            raise FileNotFoundError(f"variant {name} shipped but {path} is missing")
        record = {k: entry[k] for k in ("method", "accuracy", "accuracy_drop", "label_agreement") if k in entry}
        out[name] = (path, record)
    return out


def identical_version(store: ModelStore, model_name: str, source_sha256: str) -> ModelVersion | None:
    """The stored version of ``model_name`` made from a file with ``source_sha256``
    (the exported model before metrics were stamped in), production first, else the newest."""
    production = store.alias(model_name)
    names = sorted(store.versions(model_name), key=lambda v: (v != production, -int(v)))
    for name in names:
        version = store.get(model_name, name)
        if source_sha256 in (version.meta.get("source_sha256"), version.meta.get("sha256")):
            return version
    return None


def deploy_once(onnx_path: str | Path, store_root: str | Path, model_name: str, lineage: dict[str, Any],
                reference_clean_path: str | Path | None = None,
                variants_dir: str | Path | None = None) -> tuple[ModelVersion, bool]:
    """:func:`deploy`, idempotent: (the production version, whether it was added now).

    When the store already holds a version made from the same file (sha256), that
    version becomes (or stays) production and nothing is added: an unchanged model
    blessed again, or a deploy retried after it stored the version but before the alias
    moved, never duplicates a version.
    """
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}")
    store = ModelStore(store_root)
    variants = shipped_variants(variants_dir) if variants_dir is not None else None  # bad input fails either way
    source_sha256 = sha256_file(onnx_path)
    existing = identical_version(store, model_name, source_sha256)
    if existing is not None:
        was_production = store.alias(model_name) == existing.version
        if reference_clean_path is not None and not (existing.path / "stats.parquet").is_file():
            from kiln.stats import save_reference_statistics

            save_reference_statistics(reference_clean_path, existing.path)
        store.set_alias(model_name, existing.version)
        log.warning("%s version %s is the same model (sha256 %s): %s; no version added", model_name,
                    existing.version, source_sha256[:12],
                    "it stays production" if was_production else "production moved back to it")
        return existing, False
    meta = {"kiln_version": __version__, "git_commit": git_commit(), **onnx_lineage(onnx_path), **lineage,
            "source_sha256": source_sha256}
    with tempfile.TemporaryDirectory(prefix="kiln-deploy-") as tmp:
        source = Path(onnx_path)
        if lineage.get("metrics"):
            source = stamp_metrics(onnx_path, Path(tmp) / "model.onnx", lineage["metrics"])
        version = store.add_version(model_name, source, meta, variants=variants)
    if reference_clean_path is not None:
        from kiln.stats import save_reference_statistics

        save_reference_statistics(reference_clean_path, version.path)
    store.set_alias(model_name, version.version)
    return version, True


def deploy(onnx_path: str | Path, store_root: str | Path, model_name: str, lineage: dict[str, Any],
           reference_clean_path: str | Path | None = None, variants_dir: str | Path | None = None) -> ModelVersion:
    """Store ``onnx_path`` as the next version of ``model_name`` and make it production.

    ``lineage`` (data version, parameters, metrics...) is written into ``model.json``
    together with the kiln version, the git commit and ``source_sha256`` (the file's
    sha256 before stamping); ``lineage["metrics"]``, when given, is also stamped into the
    stored ONNX file's metadata (:func:`stamp_metrics`). With ``reference_clean_path``, the
    statistics of that clean table are stored beside the model (``stats.parquet``), so
    the next run can measure drift against the data this model learned from. With
    ``variants_dir`` (the export step's variants), the shipped variants are stored with
    the version (:meth:`ModelStore.add_version`). The version is complete on disk before
    the alias moves, and the alias moves atomically. A model already in the store is not
    added again (:func:`deploy_once`).
    """
    return deploy_once(onnx_path, store_root, model_name, lineage, reference_clean_path, variants_dir)[0]
