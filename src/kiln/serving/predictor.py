"""One stored model version behind an ONNX Runtime session, with a load/ready/predict lifecycle.

The session comes from :mod:`kiln.runtime` (``SessionSettings``), the same code and
settings evaluation runs the model with. The predictor speaks numpy and V2 datatype
names; it knows nothing about HTTP. Errors
are typed so the server can map them: ``InferenceInputError`` is the caller's fault
(HTTP 400), ``ModelLoadError`` means the version cannot be served, and
``InferenceError`` is a failure inside the runtime on valid input.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from tritonclient.utils import triton_to_np_dtype

from kiln.runtime import SessionError, SessionSettings, create_session
from kiln.store import ModelVersion, StoreError, sha256_file

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
"""The V2 ``platform`` string Triton and KServe use for ONNX Runtime models."""

# ONNX Runtime type strings -> V2 datatypes.
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

# V2 binary tensor data is little endian: pinned, whatever the host's byte order.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    datatype: np.dtype(triton_to_np_dtype(datatype)).newbyteorder("<") for datatype in _ORT_TO_V2.values()
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
        self, model_version: ModelVersion, *, session: SessionSettings | None = None, variant: str = ""
    ) -> None:
        self.model_version = model_version
        self.variant = variant
        """The stored variant asked for ("" = the fp32 model.onnx)."""
        self.served_file: Path | None = None
        """The ONNX file actually served, once loaded."""
        self.session_settings = SessionSettings() if session is None else session
        self._session: Any = None  # the onnxruntime.InferenceSession, once loaded
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

            try:
                session = create_session(path, self.session_settings)
                inputs = tuple(_spec(a) for a in session.get_inputs())
                outputs = tuple(_spec(a) for a in session.get_outputs())
                # Warm-up: the first run allocates arenas and picks kernels; pay that
                # here rather than in the first client's latency, and fail here if the
                # graph cannot run at all.
                session.run(None, {s.name: _warmup_tensor(s) for s in inputs})
            except ModelLoadError:
                raise
            except SessionError as e:
                raise ModelLoadError(str(e)) from e
            except Exception as e:  # ONNX Runtime has many error types (InvalidArgument, Fail...)
                raise ModelLoadError(f"cannot load {path}: {e}") from e
            self._inputs, self._outputs = inputs, outputs
            self.served_file = path
            self._session = session
            log.info(
                "loaded %s version %s (%s) with %s, %d intra-op threads",
                self.name,
                self.version,
                path.name,
                session.get_providers(),
                self.session_settings.intra_op_threads,
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

    def _require_ready(self) -> Any:
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
