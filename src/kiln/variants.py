"""Reduced-precision variants of an exported model: part of the export stage.

:func:`export_variants` builds int8 / fp16 copies of the fp32 ONNX file written by
:func:`kiln.export.export_onnx`, scores each against it on the validation split and
keeps only those within the accuracy budget. It lives apart from :mod:`kiln.export`
because the quantisers are a concern of their own; ``kiln.export`` re-exports the
public names, so callers keep importing them from there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from kiln.contract import INPUT_NAME
from kiln.dataset import CLEAN_COLUMNS, read_table, to_arrays
from kiln.export import ExportError, check_onnx_contract

MAX_VARIANT_ACCURACY_DROP = 0.003
"""A variant ships only if its accuracy is at most this much (a fraction: 0.3 points)
below the fp32 model's on the same (validation) table."""

VARIANTS = ("int8", "fp16", "int8_dynamic")
"""Variants :func:`export_variants` can build: ``int8`` (static QDQ quantisation,
calibrated), ``fp16`` and ``int8_dynamic`` (dynamic quantisation: accurate, but ONNX
Runtime's ConvInteger kernel is much slower than fp32 on CPU, see bench/results)."""

DEFAULT_VARIANTS = ("int8", "fp16")

CALIBRATION_IMAGES = 256
"""Images used to calibrate the static int8 activation ranges."""


def _quantize(src: Path, dst: Path, run) -> None:
    """Run an onnxruntime quantiser ``run(src, dst)`` on a copy of ``src`` without
    value_info. The exporter records value_info for the weights too; the quantiser
    rewrites those initializers (e.g. transposes Gemm weights) and then trips over the
    stale shapes in strict shape inference; it re-infers them itself."""
    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    stripped = dst.with_name(dst.name + ".noinfo.onnx")
    onnx.save_model(proto, str(stripped))
    root = logging.getLogger()
    was = root.disabled
    root.disabled = True  # the quantiser's "consider pre-processing" warning goes to the root logger
    try:
        run(stripped, dst)
    finally:
        root.disabled = was
        stripped.unlink(missing_ok=True)


def _quantize_int8_dynamic(src: Path, dst: Path, calibration: np.ndarray) -> str:
    """Dynamic int8 quantisation (weights int8, activations quantised per batch at run
    time); Conv becomes ConvInteger, Gemm/MatMul become MatMulInteger."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quantize(src, dst, lambda a, b: quantize_dynamic(str(a), str(b), weight_type=QuantType.QInt8))
    return "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)"


def _quantize_int8_static(src: Path, dst: Path, calibration: np.ndarray) -> str:
    """Static int8 quantisation in QDQ form: per-channel int8 weights, uint8 activations
    whose ranges are calibrated (min/max) on ``calibration`` pixels. ONNX Runtime fuses
    the QDQ pairs into QLinearConv / QGemm kernels at load time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: calibration[i : i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self):
            return next(self._batches, None)

    _quantize(src, dst, lambda a, b: quantize_static(
        str(a), str(b), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    ))
    return ("onnxruntime.quantization.quantize_static(QDQ, per-channel QInt8 weights, QUInt8 activations, "
            f"MinMax calibration on {len(calibration)} images)")


def _convert_fp16(src: Path, dst: Path, calibration: np.ndarray) -> str:
    """Weights and activations in float16, inputs/outputs kept as the contract's types.
    Uses the float16 converter that ships inside onnxruntime (a copy of
    onnxconverter-common's), so no extra dependency is needed."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # ImportError if absent

    proto = onnx.load(str(src))
    converted = convert_float_to_float16(proto, keep_io_types=True)
    onnx.save_model(converted, str(dst))
    return "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"


_BUILDERS: dict[str, Callable[[Path, Path, np.ndarray], str]] = {
    "int8": _quantize_int8_static,
    "fp16": _convert_fp16,
    "int8_dynamic": _quantize_int8_dynamic,
}
"""Variant name -> builder ``(src, dst, calibration pixels) -> method description``."""


def _score(entry: dict[str, Any], dst: Path, pred: np.ndarray, labels: np.ndarray, base_pred: np.ndarray,
           max_drop: float) -> None:
    """Fill ``entry`` with the built variant's accuracy against the fp32 baseline and
    whether that is within ``max_drop``."""
    base_acc = float(np.mean(base_pred == labels))
    acc = float(np.mean(pred == labels))
    drop = base_acc - acc
    ships = drop <= max_drop + 1e-12
    entry.update(
        accuracy=acc,
        accuracy_drop=drop,
        label_agreement=float(np.mean(pred == base_pred)),
        bytes=dst.stat().st_size,
        ships=ships,
        reason=f"accuracy drop {drop * 100:.2f} points {'<=' if ships else '>'} {max_drop * 100:.2f}",
    )
    if ships:
        entry["path"] = str(dst)


def _build_variant(name: str, onnx_path: Path, dst: Path, calibration: np.ndarray, pixels: np.ndarray,
                   labels: np.ndarray, base_pred: np.ndarray, max_drop: float) -> dict[str, Any]:
    """Build, check and score one variant; a variant that does not ship has its file
    removed and its ``reason`` recorded instead of raising, so one broken converter does
    not cost the others."""
    from kiln.runtime import ContractError, SessionError, predict

    entry: dict[str, Any] = {"path": None, "method": None, "accuracy": None, "accuracy_drop": None,
                             "label_agreement": None, "bytes": None, "ships": False}
    try:
        entry["method"] = _BUILDERS[name](onnx_path, dst, calibration)
        check_onnx_contract(onnx.load(str(dst)))
        _, pred = predict(dst, pixels)
    except ImportError as e:
        entry["reason"] = f"converter not available: {e}"
    except (ExportError, SessionError, ContractError, ValueError, RuntimeError) as e:
        entry["reason"] = f"variant failed: {e}"
    else:
        _score(entry, dst, pred, labels, base_pred, max_drop)
    if not entry["ships"]:
        dst.unlink(missing_ok=True)
    return entry


def export_variants(
    onnx_path: str | Path,
    out_dir: str | Path,
    val_df: pd.DataFrame,
    max_drop: float = MAX_VARIANT_ACCURACY_DROP,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    calibration_df: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Build reduced-precision variants of the exported model in ``out_dir`` and score
    each against the fp32 model on the validation table ``val_df`` (never the test
    split: the choice must not be made on the images final metrics are reported on).
    Static int8 is calibrated on the first :data:`CALIBRATION_IMAGES` images of
    ``calibration_df`` (default: ``val_df``; the pipeline passes the training split, to
    keep calibration and scoring apart).

    Returns a JSON-safe dict (also written to ``out_dir/variants.json``)::

        {"baseline": {"path", "accuracy", "bytes"}, "n": int, "max_drop": float,
         "variants": {"int8": {"path", "method", "accuracy", "accuracy_drop",
                               "label_agreement", "bytes", "ships", "reason"}, ...}}

    ``accuracy_drop`` is baseline accuracy - variant accuracy (a fraction). A variant
    ships only if it loads, keeps the contract and its drop is <= ``max_drop``; a variant
    that does not ship has its file removed and says why in ``reason``. A variant whose
    converter is unavailable is recorded with ``ships: False`` and the reason.
    """
    from kiln.runtime import predict

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if len(val_df) == 0:
        raise ValueError("variants need at least one validation image")
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels, labels = to_arrays(val_df)
    _, base_pred = predict(onnx_path, pixels)
    calibration = to_arrays(val_df if calibration_df is None else calibration_df)[0][:CALIBRATION_IMAGES]
    calibration = np.ascontiguousarray(calibration)
    results = {
        name: _build_variant(name, onnx_path, out_dir / f"{onnx_path.stem}.{name}.onnx", calibration,
                             pixels, labels, base_pred, max_drop)
        for name in variants
    }
    report = {
        "baseline": {"path": str(onnx_path), "accuracy": float(np.mean(base_pred == labels)),
                     "bytes": onnx_path.stat().st_size},
        "n": len(labels),
        "max_drop": max_drop,
        "variants": results,
    }
    (out_dir / "variants.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def run_export_variants(onnx_path: str | Path, out_dir: str | Path, val_path: str | Path,
                        calibration_path: str | Path | None = None) -> dict[str, Any]:
    """File-level entry point: exported model + clean tables -> ``out_dir`` of variants,
    scored on the validation split ``val_path``, int8 calibrated on ``calibration_path``
    (the training split in the pipeline; default: ``val_path``)."""
    calibration = None if calibration_path is None else read_table(calibration_path, CLEAN_COLUMNS)
    return export_variants(onnx_path, out_dir, read_table(val_path, CLEAN_COLUMNS), calibration_df=calibration)


__all__ = [
    "CALIBRATION_IMAGES",
    "DEFAULT_VARIANTS",
    "MAX_VARIANT_ACCURACY_DROP",
    "VARIANTS",
    "export_variants",
    "run_export_variants",
]
