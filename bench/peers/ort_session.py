"""The one way a benchmark peer opens its ONNX Runtime session and runs kiln's contract.

Every peer server (MLServer, Triton, KServe) runs in its own virtual environment
without kiln, so this module imports nothing but numpy and onnxruntime. The bench
serialises kiln's own session settings to the JSON read here and passes it on each
peer's command line; a peer never picks an option itself, so a peer cannot be given
ONNX Runtime's defaults (every core, spinning threads) while kiln runs tuned.

The settings JSON has exactly these keys (all required, nothing else allowed)::

    {"intra_op_num_threads": 2, "inter_op_num_threads": 1, "allow_spinning": false,
     "graph_optimization_level": "all", "execution_mode": "sequential",
     "providers": ["CPUExecutionProvider"]}

``graph_optimization_level`` is disable/basic/extended/all (or ORT's enum name, e.g.
``ORT_ENABLE_ALL``); ``execution_mode`` is sequential/parallel (or ``ORT_SEQUENTIAL``).
``allow_spinning`` sets both ``session.intra_op.allow_spinning`` and
``session.inter_op.allow_spinning``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("probabilities", "label")
IMAGE_SIZE = 28
NUM_CLASSES = 10
MAX_BATCH = 64
"""Largest batch a peer's batcher forms (MLServer ``max_batch_size``, Triton ``max_batch_size``)."""
MAX_BATCH_DELAY_S = 0.0005
"""Longest a request waits for others to join its batch (MLServer ``max_batch_time``,
Triton ``max_queue_delay_microseconds``)."""

SPINNING_ENTRIES = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


class SettingsError(ValueError):
    """The settings JSON is malformed (one line, names the offending key)."""


def _choice(key: str, value: Any, table: dict[str, str]) -> str:
    """The short name for ``value``, given as a short name or as ORT's enum name."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in table:
            return lowered
        for short, enum_name in table.items():
            if value.strip().upper() == enum_name:
                return short
    raise SettingsError(f"{key} must be one of {sorted(table)} (or {sorted(table.values())}), got {value!r}")


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime session settings, as the bench passes them to every peer."""

    intra_op_num_threads: int
    inter_op_num_threads: int
    allow_spinning: bool
    graph_optimization_level: str
    execution_mode: str
    providers: tuple[str, ...]

    @classmethod
    def from_mapping(cls, raw: Any) -> OrtSettings:
        if not isinstance(raw, dict):
            raise SettingsError(f"ORT settings must be a JSON object, got {type(raw).__name__}")
        wanted = {f for f in cls.__dataclass_fields__}
        missing, unknown = sorted(wanted - raw.keys()), sorted(raw.keys() - wanted)
        if missing or unknown:
            raise SettingsError(f"ORT settings: missing keys {missing}, unknown keys {unknown}")
        for key in ("intra_op_num_threads", "inter_op_num_threads"):
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{key} must be an integer >= 1, got {value!r}")
        if not isinstance(raw["allow_spinning"], bool):
            raise SettingsError(f"allow_spinning must be true or false, got {raw['allow_spinning']!r}")
        providers = raw["providers"]
        if not isinstance(providers, list) or not providers or not all(isinstance(p, str) for p in providers):
            raise SettingsError(f"providers must be a non-empty list of provider names, got {providers!r}")
        return cls(
            intra_op_num_threads=raw["intra_op_num_threads"],
            inter_op_num_threads=raw["inter_op_num_threads"],
            allow_spinning=raw["allow_spinning"],
            graph_optimization_level=_choice("graph_optimization_level", raw["graph_optimization_level"], _LEVELS),
            execution_mode=_choice("execution_mode", raw["execution_mode"], _MODES),
            providers=tuple(providers),
        )

    @classmethod
    def from_json(cls, text: str) -> OrtSettings:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SettingsError(f"ORT settings are not valid JSON: {e}") from None
        return cls.from_mapping(raw)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "providers": list(self.providers)}, sort_keys=True)

    def session_options(self) -> ort.SessionOptions:
        """These settings as ``SessionOptions`` (providers go to the session, not here)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_num_threads
        options.inter_op_num_threads = self.inter_op_num_threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.graph_optimization_level])
        options.execution_mode = getattr(ort.ExecutionMode, _MODES[self.execution_mode])
        for entry in SPINNING_ENTRIES:
            options.add_session_config_entry(entry, "1" if self.allow_spinning else "0")
        return options


def create_session(model_path: str | Path, settings: OrtSettings) -> ort.InferenceSession:
    """A session on ``model_path`` per ``settings``; refuses a provider this ORT lacks.

    ORT would otherwise fall back to the CPU with only a warning, and the peer would be
    measured on other hardware than kiln.
    """
    available = ort.get_available_providers()
    lacking = [p for p in settings.providers if p not in available]
    if lacking:
        raise SettingsError(f"providers {lacking} are not in this onnxruntime ({ort.__version__}: {available})")
    session = ort.InferenceSession(str(model_path), settings.session_options(), providers=list(settings.providers))
    names = [o.name for o in session.get_outputs()]
    if session.get_inputs()[0].name != INPUT_NAME or any(n not in names for n in OUTPUT_NAMES):
        raise SettingsError(f"{model_path}: not kiln's contract (input {INPUT_NAME!r}, outputs {OUTPUT_NAMES})")
    return session


def predict(session: ort.InferenceSession, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 [N, 10], label int64 [N]) for uint8 ``pixels`` [N, 28, 28]."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{INPUT_NAME} must be UINT8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                         f"got {pixels.dtype} {list(pixels.shape)}")
    probabilities, label = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(pixels)})
    return probabilities, label
