"""The one ONNX Runtime path: session settings, device detection, the contract's feed and outputs.

Export parity, evaluation, variant scoring, the benchmarks (and their peer servers) and
the model server all open their sessions with :func:`create_session` from one
:class:`SessionSettings`, and run the contract's model with :func:`run_contract`, so what
is evaluated is what is served. ``SessionSettings()`` is what ``kiln serve`` uses by
default; it serialises to JSON, so a process without kiln's other dependencies (a
benchmark peer in its own virtual environment) can build the identical session.

Nothing here imports torch: the serving image has none. onnxruntime itself is imported
on first use, so importing this module stays cheap for callers that never run a model.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kiln.contract import IMAGE_SIZE, INPUT_NAME, LABEL_NAME, NUM_CLASSES, PROBABILITIES_NAME

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
NVIDIA_GPU_DIR = Path("/proc/driver/nvidia/gpus")
"""One entry per GPU the NVIDIA driver sees; present in a container that was given a GPU."""

OUTPUT_NAMES = (PROBABILITIES_NAME, LABEL_NAME)
"""The contract's outputs, in the order :func:`run_contract` returns them."""


class SessionError(RuntimeError):
    """ONNX Runtime cannot open the model (missing file, invalid graph, unusable provider)."""


class ContractError(ValueError):
    """A model or its input does not follow :mod:`kiln.contract`."""


def cpu_quota(cpu_max: Path = CPU_MAX) -> int:
    """CPUs this process may use: the cgroup v2 quota rounded up, capped by os.cpu_count().

    Without a cgroup limit (no file, or ``max``) this is os.cpu_count(). Sizing ONNX
    Runtime's pool from the host's core count inside a container with a small quota
    makes its threads fight over the quota and get throttled.
    """
    cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max":
            return cores
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        return cores


def gpu_visible(gpu_dir: Path = NVIDIA_GPU_DIR) -> bool:
    """True when the NVIDIA driver lists at least one GPU.

    ONNX Runtime lists CUDAExecutionProvider as available whenever the GPU wheel is
    installed, GPU or not (asking for it then logs an error and falls back), so its
    provider list says nothing; the driver's GPU list does, and needs no torch.
    """
    try:
        return any(gpu_dir.iterdir())
    except OSError:  # no NVIDIA driver
        return False


def providers_for(device: str, gpu_dir: Path = NVIDIA_GPU_DIR) -> list[str]:
    """Execution providers to ask for on ``device``: ``cuda``, ``cpu``, or ``auto`` (CUDA
    first when the NVIDIA driver sees a GPU, else CPU only)."""
    device = device.strip().lower() or "auto"
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"KILN_DEVICE must be auto, cuda or cpu, got {device!r}")
    if device == "auto":
        device = "cuda" if gpu_visible(gpu_dir) else "cpu"
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class SessionSettings(BaseModel):
    """Everything that decides how an ONNX Runtime session runs a model.

    The defaults are the server's: every caller that wants "what is served" uses
    ``SessionSettings()`` (or the same with ``device`` pinned).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Device = Field("auto", description="auto: CUDA when the NVIDIA driver sees a GPU, else CPU")
    intra_op_threads: int = Field(
        default_factory=cpu_quota, ge=1, description="threads inside one run (default: the cgroup CPU quota)"
    )
    # Requests already run concurrently in the server's threads; a second (inter-op) pool
    # per run would only oversubscribe the CPU quota.
    inter_op_threads: int = Field(1, ge=1, description="threads running independent graph nodes in parallel")
    # Idle intra-op threads spin by default, burning the CPU that the HTTP side of the
    # server (or the next engine a benchmark times) needs; blocking costs a wake-up.
    allow_spinning: bool = Field(False, description="let idle intra-op threads spin-wait")
    graph_optimization: GraphOptimization = Field("all", description="ONNX Runtime graph optimisation level")

    def providers(self, gpu_dir: Path = NVIDIA_GPU_DIR) -> list[str]:
        """Execution providers for ``device`` (see :func:`providers_for`)."""
        return providers_for(self.device, gpu_dir)

    def session_options(self) -> ort.SessionOptions:
        """These settings as ONNX Runtime ``SessionOptions``."""
        import onnxruntime as ort

        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = (
            ort.ExecutionMode.ORT_SEQUENTIAL if self.inter_op_threads == 1 else ort.ExecutionMode.ORT_PARALLEL
        )
        options.graph_optimization_level = levels[self.graph_optimization]
        options.log_severity_level = 3  # errors only: a provider fallback is reported below, once
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        return options


def create_session(model: str | Path | bytes, settings: SessionSettings | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session for ``model`` (a path, or the serialised graph) per ``settings``
    (default ``SessionSettings()``). Raises :class:`SessionError` when it cannot be opened."""
    import onnxruntime as ort

    settings = SessionSettings() if settings is None else settings
    providers = settings.providers()
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, sess_options=settings.session_options(), providers=providers)
    except Exception as e:  # ONNX Runtime has many error types (InvalidGraph, NoSuchFile, Fail...)
        what = model if not isinstance(model, bytes) else "the model"
        raise SessionError(f"ONNX Runtime cannot load {what}: {e}") from e
    if providers[0] not in session.get_providers():
        # ONNX Runtime falls back to the next provider on its own; say so, since a GPU
        # deployment quietly running on CPU shows up only as latency.
        log.warning("%s was requested but is unusable here; running on %s", providers[0], session.get_providers())
    return session


def check_contract_io(session: ort.InferenceSession) -> None:
    """Raise :class:`ContractError` unless ``session`` takes the contract's input and gives its outputs."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name for o in session.get_outputs()}
    if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= outputs:
        raise ContractError(
            f"the model has inputs {inputs} and outputs {sorted(outputs)}; "
            f"the contract wants [{INPUT_NAME!r}] -> {PROBABILITIES_NAME}, {LABEL_NAME}"
        )


def _check_pixels(pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ContractError(f"pixels must be uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}], got {pixels.dtype}{pixels.shape}")


def run_contract(session: ort.InferenceSession, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One run of the contract's model on uint8 ``pixels`` [N, 28, 28]:
    (probabilities float32 [N, 10], label int64 [N]); :class:`ContractError` for anything else."""
    _check_pixels(pixels)
    probabilities, label = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(pixels)})
    n = len(pixels)
    if probabilities.dtype != np.float32 or probabilities.shape != (n, NUM_CLASSES):
        raise ContractError(
            f"{PROBABILITIES_NAME}: got {probabilities.dtype}{probabilities.shape}, want float32({n}, {NUM_CLASSES})"
        )
    if label.dtype != np.int64 or label.shape != (n,):
        raise ContractError(f"{LABEL_NAME}: got {label.dtype}{label.shape}, want int64({n},)")
    return probabilities, label


def predict(
    model_path: str | Path, pixels: np.ndarray, settings: SessionSettings | None = None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The contract's model at ``model_path`` on uint8 ``pixels`` [N, 28, 28], in batches.

    Returns (probabilities float32 [N, 10], label int64 [N]). Raises :class:`SessionError`
    if the file is missing or unreadable, :class:`ContractError` if its interface, its
    outputs or ``pixels`` break the contract.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise SessionError(f"ONNX model not found: {model_path}")
    session = create_session(model_path, settings)
    check_contract_io(session)
    _check_pixels(pixels)
    probs = [np.zeros((0, NUM_CLASSES), np.float32)]
    labels = [np.zeros(0, np.int64)]
    for start in range(0, len(pixels), batch_size):
        p, y = run_contract(session, pixels[start : start + batch_size])
        probs.append(p)
        labels.append(y)
    label = np.concatenate(labels)
    if len(label) and (label.min() < 0 or label.max() >= NUM_CLASSES):
        raise ContractError(f"{model_path} predicted labels outside [0, {NUM_CLASSES})")
    return np.concatenate(probs), label
