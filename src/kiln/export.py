"""Export a training checkpoint to one self-contained ONNX file, and prove it matches.

The exported graph is :class:`kiln.models.ServingModel`: uint8 ``pixels`` [N, 28, 28]
in, ``probabilities`` float32 [N, 10] and ``label`` int64 [N] out, opset
``contract.ONNX_OPSET``, with a dynamic batch dimension (see :mod:`kiln.contract`).

An export is only written under its final name after it has passed
``onnx.checker`` (full check, including strict shape inference), a structural check
against the contract, and a parity check: ONNX Runtime on CPU and PyTorch must agree
on every validation image (probabilities within ``atol``, identical labels) at batch
sizes 1, 7 and 1024 as well as over the whole table.

Data roles: the parity gate and the choice of int8/fp16 variants (built in
:mod:`kiln.variants`) run on the validation split (int8 calibration on training images);
the test split is left to the final evaluation, so the figures reported there are not
the ones variants were picked on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

import kiln
from kiln.contract import (
    CLASS_LABELS,
    IMAGE_SIZE,
    INPUT_NAME,
    LABEL_NAME,
    NUM_CLASSES,
    ONNX_OPSET,
    PROBABILITIES_NAME,
)
from kiln.dataset import CLEAN_COLUMNS, read_table, to_arrays

CHECK_BATCH_SIZES: tuple[int, ...] = (1, 7, 1024)
"""Batch sizes every export is run at, to prove the batch dimension really is dynamic."""

RESERVED_METADATA = ("kiln_version", "train_config", "train_metrics", "class_labels", "onnx_opset", "contract")
"""``metadata_props`` keys written by :func:`export_onnx`; callers may not override them."""


class ExportError(RuntimeError):
    """The exported graph is invalid or does not follow :mod:`kiln.contract`."""


class ExportParityError(ExportError):
    """ONNX Runtime and PyTorch disagree on the validation images."""


@dataclass
class ExportReport:
    """Outcome of a parity check (and so of a successful export)."""

    opset: int
    """Default-domain opset the graph imports."""
    max_abs_diff: float
    """Largest |probability(ONNX Runtime) - probability(PyTorch)| over every image checked."""
    label_agreement: float
    """Fraction of checked images whose ONNX and PyTorch labels are equal (1.0 to pass)."""
    n_checked: int
    """Validation images compared (each once over the whole table)."""
    n_label_disagreements: int
    """Images whose labels differ between ONNX Runtime and PyTorch."""
    batch_sizes: tuple[int, ...]
    """Batch sizes the ONNX model was run at, besides the whole-table pass."""
    atol: float
    """Tolerance the probabilities were held to."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        d = dataclasses.asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


def check_onnx_contract(proto: onnx.ModelProto) -> None:
    """Raise :class:`ExportError` unless ``proto``'s inputs, outputs, dtypes, shapes and
    opset are exactly those of :mod:`kiln.contract` (batch dimension symbolic)."""
    T = onnx.TensorProto
    expected = {
        "inputs": [(INPUT_NAME, T.UINT8, [None, IMAGE_SIZE, IMAGE_SIZE])],
        "outputs": [(PROBABILITIES_NAME, T.FLOAT, [None, NUM_CLASSES]), (LABEL_NAME, T.INT64, [None])],
    }
    problems: list[str] = []
    for kind, values in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        actual = []
        for v in values:
            tt = v.type.tensor_type
            # A symbolic (dim_param) or unknown dimension is the dynamic batch: None.
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            actual.append((v.name, tt.elem_type, dims))
        if actual != expected[kind]:
            problems.append(f"{kind} are {_describe(actual)}, contract wants {_describe(expected[kind])}")
    opsets = {o.domain: o.version for o in proto.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != ONNX_OPSET:
        problems.append(f"default opset is {opsets}, contract wants {ONNX_OPSET}")
    if problems:
        raise ExportError("ONNX graph breaks the contract: " + "; ".join(problems))


def _describe(values: list[tuple[str, int, list[int | None]]]) -> str:
    return ", ".join(
        f"{name}:{onnx.TensorProto.DataType.Name(dtype).lower()}{['N' if d is None else d for d in dims]}"
        for name, dtype, dims in values
    )


def _torch_proba(serving, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        probabilities, label = serving(torch.tensor(pixels))  # torch.tensor copies: input may be read-only
    return probabilities.numpy(), label.numpy()


def check_parity(
    checkpoint_path: str | Path,
    onnx_path: str | Path,
    val_df: pd.DataFrame,
    atol: float = 1e-4,
    batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
) -> ExportReport:
    """Compare the ONNX model at ``onnx_path`` (ONNX Runtime, CPU) with the checkpoint
    (PyTorch, CPU) on every image of the clean table ``val_df``, in batches of 1024,
    and once more at each of ``batch_sizes`` (images repeated when the table is smaller).

    Returns the report if every probability is within ``atol`` and every label agrees;
    otherwise raises :class:`ExportParityError` naming the max difference and the
    number of disagreeing labels. Also raises :class:`ExportError` if the outputs'
    dtypes or shapes are not the contract's.
    """
    from kiln.checkpoint import load_checkpoint
    from kiln.models import ServingModel

    if len(val_df) == 0:
        raise ValueError("parity check needs at least one validation image")
    pixels, _ = to_arrays(val_df)
    _, net = load_checkpoint(checkpoint_path)
    serving = ServingModel(net).eval()
    session = _cpu_session(onnx_path)
    # The whole table, in chunks: this is what n_label_disagreements counts.
    chunks = [pixels[start : start + 1024] for start in range(0, len(pixels), 1024)]
    max_diff, disagreements = _compare_batches(session, serving, chunks)
    # Then the dynamic batch dimension: np.resize repeats images to fill the batch.
    resized = [np.resize(pixels, (size, IMAGE_SIZE, IMAGE_SIZE)) for size in batch_sizes]
    batch_diff, batch_bad = _compare_batches(session, serving, resized)
    max_diff = max(max_diff, batch_diff)

    n = len(pixels)
    report = ExportReport(
        opset=_default_opset(onnx_path),
        max_abs_diff=max_diff,
        label_agreement=1.0 - disagreements / n,
        n_checked=n,
        n_label_disagreements=disagreements,
        batch_sizes=tuple(batch_sizes),
        atol=atol,
    )
    if max_diff > atol or disagreements or batch_bad:
        raise ExportParityError(
            f"ONNX model {onnx_path} does not match checkpoint {checkpoint_path} on {n} validation images: "
            f"max |probability difference| = {max_diff:.3g} (allowed {atol:g}), "
            f"{disagreements} of {n} labels disagree"
            + (f" (and {batch_bad} in the batch-size runs {tuple(batch_sizes)})" if batch_bad else "")
        )
    return report


def _cpu_session(onnx_path: str | Path):
    """The server's session settings on the CPU provider: parity is defined against CPU
    so the gate does not depend on which machine runs the export."""
    from kiln.runtime import SessionError, SessionSettings, create_session

    try:
        return create_session(Path(onnx_path), SessionSettings(device="cpu"))
    except SessionError as e:
        raise ExportError(str(e)) from e


def _default_opset(onnx_path: str | Path) -> int:
    """The default-domain opset the file imports (0 if none)."""
    imports = onnx.load(str(onnx_path), load_external_data=False).opset_import
    return next((o.version for o in imports if o.domain in ("", "ai.onnx")), 0)


def _compare_batches(session, serving, batches: Sequence[np.ndarray]) -> tuple[float, int]:
    """Max |probability difference| and number of disagreeing labels between ONNX
    Runtime and PyTorch over ``batches``."""
    max_diff, disagreements = 0.0, 0
    for batch in batches:
        diff, bad = _compare(session, serving, batch)
        max_diff, disagreements = max(max_diff, diff), disagreements + bad
    return max_diff, disagreements


def _compare(session, serving, batch: np.ndarray) -> tuple[float, int]:
    """One batch through both runtimes: (max |probability difference|, label disagreements)."""
    from kiln.runtime import ContractError, run_contract

    try:
        onnx_p, onnx_l = run_contract(session, batch)
    except ContractError as e:
        raise ExportError(str(e)) from e
    torch_p, torch_l = _torch_proba(serving, batch)
    diff = float(np.max(np.abs(onnx_p.astype(np.float64) - torch_p))) if len(batch) else 0.0
    if not np.isfinite(diff):  # NaN must fail the gate; Python's max() would drop it
        diff = float("inf")
    return diff, int(np.sum(onnx_l != torch_l))


def _export_proto(serving) -> onnx.ModelProto:
    """torch.onnx (dynamo exporter) -> an in-memory ModelProto with weights inlined."""
    import torch

    example = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)  # 2, not 1: export specialises size 1
    # The exporter reports progress through print/logging and warns about unrelated
    # optional packages (torchvision); none of that is actionable here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                serving,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[PROBABILITIES_NAME, LABEL_NAME],
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,  # one self-contained file
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {e}") from e
        finally:
            logging.getLogger("torch.onnx").setLevel(level)
    if program is None:  # only the legacy exporter returns None
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def export_onnx(
    checkpoint_path: str | Path,
    onnx_path: str | Path,
    val_df: pd.DataFrame,
    metadata: Mapping[str, str],
    atol: float = 1e-4,
) -> ExportReport:
    """Export the checkpoint's :class:`~kiln.models.ServingModel` to ``onnx_path``.

    ``metadata`` (e.g. ``data_version``) is written to the model's ``metadata_props``
    beside ``kiln_version``, ``git_commit`` (:func:`kiln.provenance.git_commit` unless
    ``metadata`` names one), ``train_config`` (JSON), ``train_metrics`` (JSON: the best
    epoch's validation loss and accuracy), ``class_labels`` (JSON list), ``onnx_opset``
    and ``contract``; its keys must be strings that are not in :data:`RESERVED_METADATA`
    and its values strings. ``val_df`` is the table the parity gate runs over: the
    validation split (the test split stays untouched until final evaluation).

    The file is written under a temporary name and renamed to ``onnx_path`` only after
    ``onnx.checker`` (full), the contract check and :func:`check_parity` pass; on any
    failure nothing is left at ``onnx_path`` and :class:`ExportError` or
    :class:`ExportParityError` is raised.
    """
    from kiln.checkpoint import load_checkpoint, read_checkpoint
    from kiln.models import ServingModel

    onnx_path = Path(onnx_path)
    clash = sorted(set(metadata) & set(RESERVED_METADATA))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved; export_onnx writes them itself")
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"metadata must map str to str; offending entries (value types): {bad}")

    config, net = load_checkpoint(checkpoint_path)
    proto = _export_proto(ServingModel(net).eval())
    props = _lineage(config, read_checkpoint(checkpoint_path), metadata)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "kiln digit classifier; " + props["contract"]
    _check_graph(proto)

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{onnx_path.name}.", suffix=".onnx", dir=onnx_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        report = check_parity(checkpoint_path, tmp, val_df, atol=atol)
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _lineage(config: Mapping[str, Any], ckpt: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, str]:
    """The ``metadata_props`` of an export: metadata travels inside the file, so a model
    found on disk explains itself (code, data, training config and metrics, labels)."""
    from kiln.provenance import git_commit

    best = next((row for row in ckpt.get("history", []) if row.get("epoch") == ckpt.get("best_epoch")), {})
    train_metrics = {"best_epoch": ckpt.get("best_epoch"),
                     **{k: best[k] for k in ("val_loss", "val_accuracy") if k in best}}
    return {
        "kiln_version": kiln.__version__,
        "git_commit": git_commit(),
        "train_config": json.dumps(dict(config), sort_keys=True),
        "train_metrics": json.dumps(train_metrics, sort_keys=True),
        "class_labels": json.dumps(list(CLASS_LABELS)),
        "onnx_opset": str(ONNX_OPSET),
        "contract": f"{INPUT_NAME}: uint8[N,{IMAGE_SIZE},{IMAGE_SIZE}] -> "
        f"{PROBABILITIES_NAME}: float32[N,{NUM_CLASSES}], {LABEL_NAME}: int64[N]",
        **dict(metadata),
    }


def _check_graph(proto: onnx.ModelProto) -> None:
    """onnx.checker (full) and strict shape inference, then the contract; ExportError otherwise."""
    try:
        # full_check runs strict shape inference too; infer_shapes(strict) makes sure
        # every intermediate value gets a type, which some runtimes rely on.
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"exported graph fails onnx.checker: {e}") from e
    check_onnx_contract(proto)


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


__all__ = [
    "CHECK_BATCH_SIZES",
    "RESERVED_METADATA",
    "ExportError",
    "ExportParityError",
    "ExportReport",
    "check_onnx_contract",
    "check_parity",
    "export_onnx",
    "read_metadata",
    "export_variants",
    "run_export_variants",
    "MAX_VARIANT_ACCURACY_DROP",
    "DEFAULT_VARIANTS",
    "VARIANTS",
]


def run_export(checkpoint_path: str | Path, onnx_path: str | Path, val_path: str | Path,
               metadata: Mapping[str, str]) -> ExportReport:
    """File-level entry point of the export step: checkpoint + the validation split (the
    parity gate's table) -> checked ONNX file."""
    return export_onnx(checkpoint_path, onnx_path, read_table(val_path, CLEAN_COLUMNS), metadata)


# The variants (int8 / fp16) are built in kiln.variants, which imports this module; they
# are re-exported here lazily (PEP 562) so callers keep importing them from kiln.export
# without an import cycle, whichever of the two modules is imported first.
_VARIANT_NAMES = frozenset(
    {"export_variants", "run_export_variants", "MAX_VARIANT_ACCURACY_DROP", "DEFAULT_VARIANTS", "VARIANTS",
     "CALIBRATION_IMAGES"}
)


def __getattr__(name: str) -> Any:
    if name in _VARIANT_NAMES:
        from kiln import variants

        return getattr(variants, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
