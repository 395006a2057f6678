"""The one way a benchmark peer opens its ONNX Runtime session: kiln's own, from kiln's settings.

Every peer server (KServe, MLServer, Triton) runs in its own virtual environment without
kiln installed. This module puts kiln's ``src/`` (in this checkout) on the path and uses
``kiln.runtime`` itself, which needs only numpy, pydantic and onnxruntime (each peer's
environment has them): the bench hands each peer ``SessionSettings.model_dump_json()``,
the very object ``kiln serve`` builds its sessions from, and the peer parses it with
``SessionSettings`` and opens the session with ``kiln.runtime.create_session``. So the
mapping from settings to ONNX Runtime's ``SessionOptions`` (threads, spinning, graph
optimisation, execution mode) exists once, in ``kiln.runtime``; a peer never picks an
option itself, and the two cannot drift apart.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KILN_SRC = Path(__file__).resolve().parents[2] / "src"
if str(KILN_SRC) not in sys.path:
    sys.path.append(str(KILN_SRC))  # after the venv's own packages: kiln is not installed there

import numpy as np  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from kiln.contract import IMAGE_SIZE, INPUT_NAME, NUM_CLASSES  # noqa: E402
from kiln.runtime import (  # noqa: E402
    OUTPUT_NAMES,
    ContractError,
    SessionError,
    SessionSettings,
    check_contract_io,
    run_contract,
)
from kiln.runtime import create_session as kiln_create_session  # noqa: E402

__all__ = ["IMAGE_SIZE", "INPUT_NAME", "NUM_CLASSES", "OUTPUT_NAMES", "SessionSettings", "SettingsError",
           "create_session", "describe", "load_settings", "predict"]

MAX_BATCH = 64
"""Largest batch a peer's batcher forms (MLServer ``max_batch_size``, Triton ``max_batch_size``)."""
MAX_BATCH_DELAY_S = 0.0005
"""Longest a request waits for others to join its batch (MLServer ``max_batch_time``,
Triton ``max_queue_delay_microseconds``)."""


class SettingsError(ValueError):
    """The settings are malformed, or this environment cannot honour them (one line)."""


def load_settings(raw: str | bytes | Mapping[str, Any] | SessionSettings) -> SessionSettings:
    """kiln's ``SessionSettings`` from its JSON (or the parsed object); SettingsError if invalid."""
    if isinstance(raw, SessionSettings):
        return raw
    try:
        if isinstance(raw, (str, bytes)):
            return SessionSettings.model_validate_json(raw)
        return SessionSettings.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
                             for err in e.errors(include_url=False))
        raise SettingsError(f"session settings: {problems}") from None


def describe(settings: SessionSettings) -> dict[str, Any]:
    """The ONNX Runtime options these settings give, read back from ``SessionOptions`` (for results)."""
    options = settings.session_options()
    return {
        "intra_op_num_threads": options.intra_op_num_threads,
        "inter_op_num_threads": options.inter_op_num_threads,
        "allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning") == "1",
        "graph_optimization_level": options.graph_optimization_level.name,
        "execution_mode": options.execution_mode.name,
        "providers": settings.providers(),
    }


def create_session(model_path: str | Path, settings: SessionSettings) -> Any:
    """kiln's session on ``model_path`` per ``settings``; refuses a provider fallback and a
    model that is not kiln's contract (SettingsError).

    ONNX Runtime would otherwise fall back to the CPU with only a warning, and the peer
    would be measured on other hardware than kiln.
    """
    try:
        session = kiln_create_session(Path(model_path), settings)
        check_contract_io(session)
    except (SessionError, ContractError) as e:
        raise SettingsError(str(e)) from None
    wanted = settings.providers()[0]
    if wanted not in session.get_providers():
        raise SettingsError(f"{wanted} is not usable in this onnxruntime (session runs on {session.get_providers()})")
    return session


def predict(session: Any, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 [N, 10], label int64 [N]) for uint8 ``pixels`` [N, 28, 28]
    (``kiln.runtime.run_contract``; its ContractError is a ValueError)."""
    return run_contract(session, pixels)
