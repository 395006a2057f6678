"""One stored model version behind an ONNX Runtime session, with a load/ready/predict lifecycle.

The predictor speaks numpy and V2 datatype names; it knows nothing about HTTP. Errors
are typed so the server can map them: ``InferenceInputError`` is the caller's fault
(HTTP 400), ``ModelLoadError`` means the version cannot be served, and
``InferenceError`` is a failure inside the runtime on valid input.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from kiln.store import ModelVersion, StoreError, sha256_file

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
"""The V2 ``platform`` string Triton and KServe use for ONNX Runtime models."""

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

# ONNX Runtime type strings -> V2 datatypes -> numpy dtypes. Numpy dtypes are pinned to
# little endian because V2 binary tensor data is little endian.
_ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
"""V2 datatype -> the numpy dtype a tensor of that datatype is held in (BYTES: objects)."""


class ModelLoadError(RuntimeError):
    """The model version cannot be loaded: missing file, checksum mismatch, invalid graph."""


class InferenceInputError(ValueError):
    """The inputs do not fit the model (names, datatypes, shapes, non-finite values)."""


class InferenceError(RuntimeError):
    """ONNX Runtime failed on inputs that passed validation."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, V2 datatype, shape with -1 for dynamic dimensions."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return V2_TO_NUMPY[self.datatype]

    def metadata(self) -> dict[str, Any]:
        """This tensor as a V2 ``$metadata_tensor`` object."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


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


NVIDIA_GPU_DIR = Path("/proc/driver/nvidia/gpus")
"""One entry per GPU the NVIDIA driver sees; present in a container that was given a GPU."""


def providers_from_env(env: Mapping[str, str] | None = None, gpu_dir: Path = NVIDIA_GPU_DIR) -> list[str]:
    """Execution providers for the device ``KILN_DEVICE`` names (see :func:`providers_for`)."""
    env = os.environ if env is None else env
    return providers_for(env.get("KILN_DEVICE", "auto"), gpu_dir)


def providers_for(device: str, gpu_dir: Path = NVIDIA_GPU_DIR) -> list[str]:
    """Execution providers to ask for on ``device``: ``cuda``, ``cpu``, or ``auto`` (CUDA
    first when the NVIDIA driver sees a GPU, else CPU only).

    ONNX Runtime lists CUDAExecutionProvider as available whenever the GPU wheel is
    installed, GPU or not (asking for it then logs an error and falls back), so its
    list says nothing; the driver's GPU list does.
    """
    device = device.strip().lower() or "auto"
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"KILN_DEVICE must be auto, cuda or cpu, got {device!r}")
    if device == "auto":
        try:
            device = "cuda" if any(gpu_dir.iterdir()) else "cpu"
        except OSError:  # no NVIDIA driver
            device = "cpu"
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which V2 cannot carry")
    # ONNX Runtime reports a symbolic dimension as a string and an unknown one as None.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxPredictor:
    """Serve one ``ModelVersion`` from the store.

    Lifecycle: construct (cheap, no I/O) -> ``load()`` (checksum, session, warm-up) ->
    ``ready`` is True -> ``predict()`` from any number of threads (ONNX Runtime's
    ``run`` is thread-safe). ``load()`` is idempotent and thread-safe.
    """

    def __init__(
        self,
        model_version: ModelVersion,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        variant: str = "",
    ) -> None:
        self.model_version = model_version
        self.variant = variant
        """The stored variant asked for ("" = the fp32 model.onnx)."""
        self.served_file: Path | None = None
        """The ONNX file actually served, once loaded."""
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.intra_op_threads = intra_op_threads if intra_op_threads is not None else cpu_quota()
        self._session: ort.InferenceSession | None = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.model_version.model

    @property
    def version(self) -> str:
        return self.model_version.version

    @property
    def ready(self) -> bool:
        """True once ``load()`` has succeeded."""
        return self._session is not None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Model inputs in graph order (empty before ``load()``)."""
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Model outputs in graph order (empty before ``load()``)."""
        return self._outputs

    def load(self) -> None:
        """Verify the ONNX file against ``model.json``'s sha256, open a session, warm it up.

        With ``variant`` set, the version's stored variant of that name is served; a
        version that shipped no such variant (its accuracy drop was too large, or it was
        deployed before variants existed) serves its fp32 model instead, with a warning.
        Raises ModelLoadError on any failure; the predictor then stays not ready.
        """
        with self._lock:
            if self._session is not None:
                return
            try:
                path, expected = self.model_version.model_file(self.variant)
            except StoreError as e:
                log.warning("%s; serving its fp32 model", e)
                path, expected = self.model_version.model_file("")
            if not isinstance(expected, str) or not expected:
                raise ModelLoadError(f"{self.model_version.path}/model.json has no sha256")
            try:
                actual = sha256_file(path)
            except OSError as e:
                raise ModelLoadError(f"cannot read {path}: {e}") from e
            if actual != expected:
                # A file that is not what was evaluated and deployed must never be served.
                raise ModelLoadError(f"checksum mismatch for {path}: model.json says {expected}, file is {actual}")

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads
            # Requests already run concurrently in the server's thread pool; a second
            # (inter-op) pool per request would only oversubscribe the CPU quota.
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.log_severity_level = 3
            # Idle intra-op threads spin by default, burning the CPU that the HTTP side of
            # the server needs between inferences; blocking instead costs a wake-up.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
                inputs = tuple(_spec(a) for a in session.get_inputs())
                outputs = tuple(_spec(a) for a in session.get_outputs())
                # Warm-up: the first run allocates arenas and picks kernels; pay that
                # here rather than in the first client's latency, and fail here if the
                # graph cannot run at all.
                session.run(None, {s.name: _warmup_tensor(s) for s in inputs})
            except ModelLoadError:
                raise
            except Exception as e:  # ONNX Runtime has many error types (InvalidGraph, NoSuchFile, Fail...)
                raise ModelLoadError(f"cannot load {path}: {e}") from e
            self._inputs, self._outputs = inputs, outputs
            self.served_file = path
            self._session = session
            if self.providers[0] not in session.get_providers():
                # ONNX Runtime falls back to the next provider on its own; say so, since a
                # GPU deployment quietly running on CPU shows up only as latency.
                log.warning("%s was requested but is unusable here; running on %s", self.providers[0], session.get_providers())
            log.info(
                "loaded %s version %s (%s) with %s, %d intra-op threads",
                self.name,
                self.version,
                path.name,
                session.get_providers(),
                self.intra_op_threads,
            )

    def metadata(self, versions: Sequence[str] | None = None) -> dict[str, Any]:
        """V2 model metadata (``$metadata_model_response``) read from the session.

        ``versions`` defaults to this predictor's own version; a server that can address
        other versions of the same model passes them all.
        """
        self._require_ready()
        return {
            "name": self.name,
            "versions": list(versions) if versions is not None else [self.version],
            "platform": PLATFORM,
            "inputs": [s.metadata() for s in self._inputs],
            "outputs": [s.metadata() for s in self._outputs],
        }

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` (one array per model input, exact datatype and shape).

        Returns the requested outputs (all outputs when ``output_names`` is None) by name.
        Raises InferenceInputError when the inputs or output names do not fit the model,
        InferenceError when ONNX Runtime fails anyway, ModelLoadError if not loaded.
        """
        return self.run(self.validate(inputs), output_names)

    @property
    def batchable(self) -> bool:
        """True when every input and output has a dynamic first (batch) dimension.

        Only then can requests be concatenated along axis 0 and the outputs split back.
        """
        specs = self._inputs + self._outputs
        return bool(self._inputs) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` checked against the model (InferenceInputError) as a contiguous feed."""
        self._require_ready()
        return self._validate(inputs)

    def run(self, feed: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run an already validated ``feed`` (see ``validate``); errors as in ``predict``."""
        session = self._require_ready()
        known = {s.name for s in self._outputs}
        names = [s.name for s in self._outputs] if output_names is None else list(output_names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InferenceInputError(f"unknown output(s) {unknown}; the model has {sorted(known)}")
        try:
            results = session.run(names, feed)
        except InvalidArgument as e:
            # Validation covered names, datatypes and ranks; what ONNX Runtime still calls
            # an invalid argument (e.g. a dimension the graph cannot reshape) is the input.
            raise InferenceInputError(f"the model rejected the input: {e}") from e
        except Exception as e:  # ONNX Runtime's other failures are ours, not the caller's
            raise InferenceError(f"inference failed: {e}") from e
        return dict(zip(names, results, strict=True))

    def _require_ready(self) -> ort.InferenceSession:
        if self._session is None:
            raise ModelLoadError(f"{self.name} version {self.version} is not loaded")
        return self._session

    def _validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {s.name: s for s in self._inputs}
        missing = sorted(set(expected) - set(inputs))
        extra = sorted(set(inputs) - set(expected))
        if missing or extra:
            raise InferenceInputError(
                f"expected inputs {sorted(expected)}; missing {missing}, unexpected {extra}"
            )
        feed: dict[str, np.ndarray] = {}
        for name, spec in expected.items():
            array = np.asarray(inputs[name])
            if spec.datatype == "BYTES":
                ok = array.dtype.kind in "OSU"
            else:
                ok = array.dtype == spec.dtype
            if not ok:
                raise InferenceInputError(f"input {name!r} must be {spec.datatype}, got numpy {array.dtype}")
            if array.ndim != len(spec.shape) or any(
                want != -1 and got != want for got, want in zip(array.shape, spec.shape, strict=True)
            ):
                raise InferenceInputError(f"input {name!r} has shape {list(array.shape)}, the model takes {list(spec.shape)}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InferenceInputError(f"input {name!r} contains NaN or infinity")
            feed[name] = np.ascontiguousarray(array)
        return feed


def _warmup_tensor(spec: TensorSpec) -> np.ndarray:
    shape = tuple(1 if d == -1 else d for d in spec.shape)
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=np.object_)
    return np.zeros(shape, dtype=spec.dtype)
