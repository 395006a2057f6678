"""The kiln model server: the KServe Open Inference Protocol (V2 REST) over ONNX Runtime.

One model name is served. Its ``production`` version is loaded at startup and answers
``/v2/models/{model}/...``; every stored version is also addressable (and loaded on first
use) under ``/v2/models/{model}/versions/{version}/...``, the last ``keep_versions`` loaded
ones staying in memory. The production alias is polled every ``poll_interval_s``: when it
moves, the new version is loaded in the background (checksum, session, warm-up) and then
swapped in atomically; a version that fails to load is logged and counted, and the old
one keeps serving.

Concurrent requests to one version are merged into one inference (dynamic batching, see
``kiln.serving.batching``); inference runs in an executor so health probes always answer.
On SIGTERM (``main``) readiness turns false at once, requests keep being served for
``drain_delay_s`` (so the load balancer stops sending), then in-flight requests finish
and the process exits 0.

Besides JSON tensors the server speaks Triton's binary tensor data extension, so
``tritonclient.http`` works with ``binary_data`` on or off, and it accepts gzip or
deflate request bodies. Any error is answered as ``{"error": "..."}``: 400 for what the
client sent, 404 for unknown models or versions, 413 for bodies over the limit, 503 when
the model is not ready.

Besides the model's own inputs, a request may send ``image``: BYTES, shape ``[N]``, each
element a 28x28 PNG (raw bytes in binary mode, base64 text in JSON mode, since JSON
strings cannot carry arbitrary bytes). It is decoded to the model's uint8 ``pixels``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import gc
import io
import json
import logging
import math
import signal
import struct
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from kiln import __version__
from kiln.contract import IMAGE_SIZE, INPUT_NAME
from kiln.serving.batching import Batcher
from kiln.serving.config import DEFAULT_MAX_BODY_BYTES, ServerSettings
from kiln.serving.predictor import (
    V2_TO_NUMPY,
    InferenceError,
    InferenceInputError,
    ModelLoadError,
    OnnxPredictor,
    providers_for,
    providers_from_env,
)
from kiln.store import ModelStore, StoreError

log = logging.getLogger(__name__)

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
"""The extra BYTES input holding PNGs, decoded into the contract's ``pixels``."""

INLINE_BODY_BYTES = 64 * 1024
"""Identity-encoded request bodies up to this size are decoded on the event loop."""
INLINE_OUTPUT_ELEMENTS = 4096
"""Responses of up to this many output elements are encoded on the event loop."""

_UNKNOWN = "_unknown"  # metric label for names the client made up: keeps label sets bounded
_BYTES_PREFIX = struct.Struct("<I")  # BYTES elements in binary data: 4-byte LE length + bytes


class ApiError(Exception):
    """An error answered to the client as ``{"error": message}`` with ``status_code``."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


# --- the V2 inference request ($inference_request), validated by pydantic -----------------

NonNegativeInt = Annotated[StrictInt, Field(ge=0)]


class RequestInput(BaseModel):
    """``$request_input``: ``data`` (JSON, flat or nested) or ``parameters.binary_data_size``."""

    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    shape: list[NonNegativeInt]
    datatype: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """``$request_output``: which output, and whether to return it as binary data."""

    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """``$inference_request``. ``outputs`` absent means every output of the model."""

    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


# --- models -----------------------------------------------------------------------------


class ModelRepository:
    """The served model's versions: production, and an LRU of other loaded versions.

    ``get`` and ``load_version`` block (they may hash and load a model), so callers on the
    event loop run them in the thread pool. Versions are immutable in the store, so a
    loaded predictor stays valid. At most ``keep_versions`` predictors stay loaded; the
    production one is never evicted. ``production`` is replaced by one assignment, so a
    request sees the old version or the new one, never a mix.
    """

    def __init__(
        self,
        store: ModelStore,
        model_name: str,
        *,
        providers: Sequence[str],
        intra_op_threads: int | None = None,
        keep_versions: int = 3,
        on_load: Callable[[str, bool], None] | None = None,
        variant: str = "",
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.store = store
        self.model_name = model_name
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.variant = variant
        self.keep_versions = keep_versions
        self.on_load = on_load
        self.production: OnnxPredictor | None = None
        self._loaded: OrderedDict[str, OnnxPredictor] = OrderedDict()  # least recently used first
        self._pending: dict[str, OnnxPredictor] = {}  # constructed, being loaded
        self._lock = threading.Lock()

    def load_production(self) -> None:
        """Load the version ``production`` points at; without the alias stay not ready.

        Raises ModelLoadError when the alias exists but its version cannot be served, so a
        broken deployment fails at startup instead of serving nothing quietly.
        """
        try:
            version = self.store.alias(self.model_name)
        except StoreError as e:
            raise ModelLoadError(str(e)) from e
        if version is None:
            log.warning("model %s has no production version in %s: not ready", self.model_name, self.store.root)
            return
        self.set_production(self.load_version(version))

    def set_production(self, predictor: OnnxPredictor) -> None:
        """Serve the loaded ``predictor`` as production from the next request on."""
        with self._lock:
            self._loaded[predictor.version] = predictor
            self._loaded.move_to_end(predictor.version)
            self.production = predictor
            self._evict()

    def load_version(self, version: str) -> OnnxPredictor:
        """The loaded predictor of ``version`` (loading it now if needed); ModelLoadError."""
        with self._lock:
            predictor = self._loaded.get(version)
            if predictor is not None:
                self._loaded.move_to_end(version)
                return predictor
            predictor = self._pending.get(version)
            if predictor is None:
                try:
                    model_version = self.store.get(self.model_name, version)
                except StoreError as e:
                    self._report(version, False)
                    raise ModelLoadError(str(e)) from e
                predictor = OnnxPredictor(
                    model_version, providers=self.providers, intra_op_threads=self.intra_op_threads,
                    variant=self.variant,
                )
                self._pending[version] = predictor
        try:
            was_ready = predictor.ready
            predictor.load()  # outside our lock: the predictor's own lock serialises loads of one version
        except ModelLoadError:
            with self._lock:
                if self._pending.get(version) is predictor:
                    del self._pending[version]  # the next request tries again
            self._report(version, False)
            raise
        with self._lock:
            if self._pending.get(version) is predictor:
                del self._pending[version]
            current = self._loaded.setdefault(version, predictor)
            self._loaded.move_to_end(version)
            self._evict()
        if not was_ready and current is predictor:
            self._report(version, True)
        return current

    def loaded_versions(self) -> list[str]:
        """Versions held loaded, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _evict(self) -> None:
        while len(self._loaded) > self.keep_versions:
            victim = next((v for v, p in self._loaded.items() if p is not self.production), None)
            if victim is None:
                return
            del self._loaded[victim]
            log.info("unloaded %s version %s (keeping %d versions)", self.model_name, victim, self.keep_versions)

    def _report(self, version: str, ok: bool) -> None:
        if self.on_load is not None:
            self.on_load(version, ok)

    def versions(self) -> list[str]:
        return self.store.versions(self.model_name)

    def get(self, model: str, version: str | None = None) -> OnnxPredictor:
        """The loaded predictor for ``model`` (production when ``version`` is None).

        ApiError 404 for another model or a version not in the store, 503 when there is no
        production version or the version cannot be loaded.
        """
        if model != self.model_name:
            raise ApiError(404, f"unknown model {model!r}")
        if version is None:
            production = self.production
            if production is None:
                raise ApiError(503, f"model {model!r} has no production version loaded")
            return production
        if not version.isdigit() or version not in self.versions():
            raise ApiError(404, f"unknown version {version!r} of model {model!r}")
        try:
            return self.load_version(version)
        except ModelLoadError as e:
            log.error("cannot load %s version %s: %s", model, version, e)
            raise ApiError(503, f"version {version} of model {model!r} cannot be loaded: {e}") from e


# --- request decoding ---------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw request body; ApiError 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError as e:
            raise ApiError(400, f"invalid Content-Length {declared!r}") from e
        if declared_size > limit:
            raise ApiError(413, f"request body of {declared_size} bytes exceeds the limit of {limit}")
    # Chunked bodies have no length up front: count while reading, stop at the limit.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``body`` decoded per its Content-Encoding (identity, gzip, deflate), at most ``limit`` bytes."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r} (use gzip or deflate)")
    # The limit also bounds the decompressed size, or a small bomb could fill memory.
    decompressor = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        plain = decompressor.decompress(body, limit + 1)
    except zlib.error as e:
        raise ApiError(400, f"invalid {encoding} body: {e}") from e
    if len(plain) > limit:
        raise ApiError(413, f"decompressed request body exceeds the limit of {limit} bytes")
    if not decompressor.eof:
        raise ApiError(400, f"truncated {encoding} body")
    return plain


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) per ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        size = int(header_length)
    except ValueError as e:
        raise ApiError(400, f"invalid {HEADER_LENGTH} {header_length!r}") from e
    if not 0 <= size <= len(body):
        raise ApiError(400, f"{HEADER_LENGTH} {size} does not fit a body of {len(body)} bytes")
    return body[:size], memoryview(body)[size:]


def _parse_request(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        raise ApiError(400, f"invalid inference request: {_describe(e)}") from e


def _describe(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors(include_url=False)
    )


def _deserialize_bytes(chunk: memoryview, count: int, name: str) -> list[bytes]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise ApiError(400, f"input {name!r}: truncated BYTES element length")
        (size,) = _BYTES_PREFIX.unpack_from(chunk, offset)
        offset += 4
        if offset + size > len(chunk):
            raise ApiError(400, f"input {name!r}: BYTES element overruns its binary data")
        elements.append(bytes(chunk[offset : offset + size]))
        offset += size
    if len(elements) != count:
        raise ApiError(400, f"input {name!r} holds {len(elements)} BYTES elements, its shape says {count}")
    return elements


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_numeric(inp: RequestInput, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    try:
        raw = np.asarray(inp.data)
    except (ValueError, OverflowError) as e:  # ragged nesting, integers beyond 64 bits
        raise ApiError(400, f"input {inp.name!r}: data is not a regular array of numbers") from e
    if raw.size != count or (raw.ndim > 1 and raw.shape != shape):
        raise ApiError(400, f"input {inp.name!r}: data of shape {list(raw.shape)} does not match shape {list(shape)}")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    # JSON numbers are typed by value: only accept values the datatype can hold exactly,
    # never silently truncate 3.7 to 3 or wrap 256 to 0.
    if dtype.kind == "b":
        if raw.dtype.kind != "b":
            raise ApiError(400, f"input {inp.name!r} is BOOL: data must be true/false")
    elif dtype.kind in "iu":
        if raw.dtype.kind not in "iu":
            raise ApiError(400, f"input {inp.name!r} is {inp.datatype}: data must be integers")
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ApiError(400, f"input {inp.name!r}: values outside the {inp.datatype} range [{info.min}, {info.max}]")
    else:
        if raw.dtype.kind not in "iuf":
            raise ApiError(400, f"input {inp.name!r} is {inp.datatype}: data must be numbers")
        if not np.isfinite(raw).all():
            raise ApiError(400, f"input {inp.name!r} contains NaN or infinity")
    with np.errstate(over="ignore"):
        array = raw.astype(dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise ApiError(400, f"input {inp.name!r}: values overflow {inp.datatype}")
    return array


def _decode_input(inp: RequestInput, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input as a numpy array, and the offset of the next input's binary data."""
    dtype = V2_TO_NUMPY.get(inp.datatype)
    if dtype is None:
        raise ApiError(400, f"input {inp.name!r}: unknown datatype {inp.datatype!r}")
    shape = tuple(inp.shape)
    count = math.prod(shape)
    if "shared_memory_region" in inp.parameters:
        raise ApiError(400, "shared memory inputs are not supported")
    size = inp.parameters.get("binary_data_size")
    if size is not None:
        if inp.data is not None:
            raise ApiError(400, f"input {inp.name!r} has both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ApiError(400, f"input {inp.name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise ApiError(400, f"input {inp.name!r}: binary_data_size {size} overruns the request body")
        chunk = binary[offset : offset + size]
        if inp.datatype == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = _deserialize_bytes(chunk, count, inp.name)
            return array.reshape(shape), offset + size
        if size != count * dtype.itemsize:
            raise ApiError(
                400, f"input {inp.name!r}: {size} bytes of binary data for shape {list(shape)} {inp.datatype}"
            )
        array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise ApiError(400, f"input {inp.name!r} contains NaN or infinity")
        return array, offset + size
    if inp.data is None:
        raise ApiError(400, f"input {inp.name!r} has neither data nor binary_data_size")
    if inp.datatype == "BYTES":
        flat = _flatten(inp.data)
        if len(flat) != count or not all(isinstance(x, str) for x in flat):
            raise ApiError(400, f"input {inp.name!r}: BYTES data must be {count} strings")
        array = np.empty(count, dtype=object)
        array[:] = [x.encode() for x in flat]
        return array.reshape(shape), offset
    return _json_numeric(inp, dtype, shape), offset


def _decode_images(array: np.ndarray, from_json: bool) -> np.ndarray:
    """PNG elements of the ``image`` input -> uint8 ``pixels`` [N, 28, 28]."""
    if array.ndim != 1:
        raise ApiError(400, f"input {IMAGE_INPUT!r} must have shape [N], got {list(array.shape)}")
    pixels = np.empty((len(array), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, element in enumerate(array):
        data = element
        if from_json:
            try:
                data = base64.b64decode(element, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ApiError(400, f"{IMAGE_INPUT}[{i}] is not base64: {e}") from e
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                # Check the header's size before decoding pixels: a wrong or huge image
                # is rejected without paying for (or being bombed by) its decompression.
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    raise ApiError(
                        400, f"{IMAGE_INPUT}[{i}] is {image.size[0]}x{image.size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
                    )
                pixels[i] = np.asarray(image.convert("L"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise ApiError(400, f"{IMAGE_INPUT}[{i}] is not a readable PNG: {e}") from e
    return pixels


def _decode_inputs(request: InferenceRequest, binary: memoryview, predictor: OnnxPredictor) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    specs = {s.name: s for s in predictor.inputs}
    offset = 0
    for inp in request.inputs:
        array, offset = _decode_input(inp, binary, offset)
        name = inp.name
        if name == IMAGE_INPUT and IMAGE_INPUT not in specs and INPUT_NAME in specs:
            if inp.datatype != "BYTES":
                raise ApiError(400, f"input {IMAGE_INPUT!r} must be BYTES (PNG files)")
            array = _decode_images(array, from_json=inp.parameters.get("binary_data_size") is None)
            name = INPUT_NAME
        elif name not in specs:
            raise ApiError(400, f"unknown input {name!r}; the model takes {sorted(specs)}")
        elif inp.datatype != specs[name].datatype:
            raise ApiError(400, f"input {name!r} is {specs[name].datatype}, the request says {inp.datatype}")
        if name in inputs:
            raise ApiError(400, f"input {name!r} given more than once")
        inputs[name] = array
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return inputs


def _requested_outputs(request: InferenceRequest, predictor: OnnxPredictor) -> list[tuple[str, bool]]:
    """(output name, as binary data) in response order."""
    default_binary = request.parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ApiError(400, "parameter binary_data_output must be true or false")
    if request.outputs is None:
        return [(s.name, default_binary) for s in predictor.outputs]
    known = {s.name for s in predictor.outputs}
    wanted: list[tuple[str, bool]] = []
    for out in request.outputs:
        if out.name not in known:
            raise ApiError(400, f"unknown output {out.name!r}; the model has {sorted(known)}")
        if any(out.name == name for name, _ in wanted):
            raise ApiError(400, f"output {out.name!r} requested more than once")
        if out.parameters.get("classification"):
            raise ApiError(400, "the classification extension is not supported")
        if "shared_memory_region" in out.parameters:
            raise ApiError(400, "shared memory outputs are not supported")
        binary = out.parameters.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise ApiError(400, f"output {out.name!r}: binary_data must be true or false")
        wanted.append((out.name, binary))
    return wanted


# --- response encoding --------------------------------------------------------------------


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for x in array.ravel():
            b = x.encode() if isinstance(x, str) else bytes(x)
            parts += [_BYTES_PREFIX.pack(len(b)), b]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=V2_TO_NUMPY[datatype]).tobytes()


def _to_json(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [x if isinstance(x, str) else bytes(x).decode("utf-8", "replace") for x in array.ravel()]
    return array.ravel().tolist()


def _decode(
    predictor: OnnxPredictor, body: bytes, headers: Mapping[str, str], limit: int
) -> tuple[InferenceRequest, dict[str, np.ndarray], list[tuple[str, bool]]]:
    """Decompress, parse, decode and validate: (request, model feed, wanted outputs)."""
    body = _decompress(body, headers.get("content-encoding"), limit)
    header, binary = _split_body(body, headers.get(HEADER_LENGTH))
    request = _parse_request(header)
    inputs = _decode_inputs(request, binary, predictor)
    wanted = _requested_outputs(request, predictor)
    try:
        feed = predictor.validate(inputs)
    except InferenceInputError as e:
        raise ApiError(400, str(e)) from e
    return request, feed, wanted


def _encode(
    predictor: OnnxPredictor, request: InferenceRequest, wanted: list[tuple[str, bool]], results: Mapping[str, np.ndarray]
) -> Response:
    """The V2 response (JSON, or JSON + binary tensor data) for the ``wanted`` outputs."""
    datatypes = {s.name: s.datatype for s in predictor.outputs}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, as_binary in wanted:
        array, datatype = results[name], datatypes[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if as_binary:
            blob = _to_binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(array, datatype)
        outputs.append(entry)
    payload: dict[str, Any] = {"model_name": predictor.name, "model_version": predictor.version}
    if request.id is not None:
        payload["id"] = request.id
    payload["outputs"] = outputs
    if not blobs:
        return JSONResponse(payload)
    json_part = json.dumps(payload, separators=(",", ":")).encode()
    return Response(
        json_part + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(json_part))},
    )


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


# --- metrics --------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own (one per application)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.requests = Counter(
            "kiln_inference_requests",
            "Inference requests by model, version and HTTP status code.",
            ["model", "version", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "kiln_inference_request_duration_seconds",
            "Inference request latency (total), body read to response built.",
            ["model", "version"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue = Histogram(
            "kiln_inference_queue_duration_seconds",
            "Time a request waited in the batching queue before its inference started.",
            ["model", "version"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.compute = Histogram(
            "kiln_inference_compute_duration_seconds",
            "ONNX Runtime time of one inference run (one batch).",
            ["model", "version"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.batch_rows = Histogram(
            "kiln_inference_batch_size",
            "Rows (first-dimension elements) per inference run.",
            ["model", "version"],
            registry=registry,
            buckets=_BATCH_BUCKETS,
        )
        self.batch_requests = Histogram(
            "kiln_inference_batch_requests",
            "Requests merged into one inference run.",
            ["model", "version"],
            registry=registry,
            buckets=_BATCH_BUCKETS,
        )
        self.loads = Counter(
            "kiln_model_loads",
            "Model version loads by model, version and result (success, failure).",
            ["model", "version", "result"],
            registry=registry,
        )
        self.production_version = Gauge(
            "kiln_model_production_version",
            "The version number served as production (0: none).",
            ["model"],
            registry=registry,
        )
        self.draining = Gauge("kiln_server_draining", "1 while the server drains before shutting down.", registry=registry)


# --- the application ----------------------------------------------------------------------


def create_app(
    store_root: Path,
    model_name: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    batching: bool = True,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 500,
    poll_interval_s: float = 2.0,
    keep_versions: int = 3,
    variant: str = "",
    freeze_gc: bool = False,
) -> FastAPI:
    """The V2 application serving ``model_name`` from the model store at ``store_root``.

    Nothing is loaded until the application's lifespan starts (the production version
    then, other versions on first use). ``providers`` defaults to ``providers_from_env()``;
    ``intra_op_threads`` to the container's CPU quota. ``poll_interval_s`` 0 turns hot
    reload off. ``variant`` (e.g. ``int8``) serves each version's stored variant of that
    name where it has one. Each application has its own Prometheus registry, exposed at ``/metrics``.
    ``freeze_gc`` moves every object alive once the production version is loaded out of the
    garbage collector's reach (``gc.freeze``): for a server process of its own, not for an
    application embedded in a longer-lived process.
    ``app.state.draining = True`` turns readiness false (``main`` does so on SIGTERM).
    """
    if max_body_bytes <= 0 or max_batch_size < 1 or max_queue_delay_us < 0 or poll_interval_s < 0:
        raise ValueError("max_body_bytes and max_batch_size must be positive, delays not negative")
    metrics = ServerMetrics()

    def on_load(version: str, ok: bool) -> None:
        metrics.loads.labels(model_name, version, "success" if ok else "failure").inc()

    repo = ModelRepository(
        ModelStore(store_root),
        model_name,
        providers=providers_from_env() if providers is None else providers,
        intra_op_threads=intra_op_threads,
        keep_versions=keep_versions,
        on_load=on_load,
        variant=variant,
    )
    metrics.production_version.labels(model_name).set(0)
    # Inference runs here, off the event loop and apart from the request thread pool.
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-infer")
    batchers: weakref.WeakKeyDictionary[OnnxPredictor, Batcher] = weakref.WeakKeyDictionary()

    def batcher_for(predictor: OnnxPredictor) -> Batcher:
        batcher = batchers.get(predictor)
        if batcher is None:
            labels = (predictor.name, predictor.version)

            def observe(requests: int, rows: int, compute_s: float) -> None:
                metrics.batch_requests.labels(*labels).observe(requests)
                metrics.batch_rows.labels(*labels).observe(rows)
                metrics.compute.labels(*labels).observe(compute_s)

            batcher = Batcher(
                predictor,
                executor,
                max_batch_size=max_batch_size if batching else 1,
                max_queue_delay_s=max_queue_delay_us / 1e6 if batching else 0.0,
                observe=observe,
            )
            batchers[predictor] = batcher
        return batcher

    state: dict[str, Any] = {"failed": None}  # the alias target that last failed to load

    async def reload_once() -> None:
        """Follow the production alias once: load a new target, swap it in if it loads."""
        try:
            version = await run_in_threadpool(repo.store.alias, model_name)
        except StoreError as e:
            log.error("cannot read the production alias of %s: %s", model_name, e)
            return
        current = repo.production
        if version is None:
            return
        if current is not None and current.version == version:
            state["failed"] = None  # moved back: a later move to the failed version retries it
            return
        if version == state["failed"]:
            return  # not retried every poll; moving the alias away and back retries it
        log.info("production alias of %s moved to version %s: loading it", model_name, version)
        try:
            predictor = await run_in_threadpool(repo.load_version, version)
        except ModelLoadError as e:
            state["failed"] = version
            log.error("version %s of %s cannot be loaded, still serving %s: %s",
                      version, model_name, current.version if current else "nothing", e)
            return
        state["failed"] = None
        repo.set_production(predictor)
        metrics.production_version.labels(model_name).set(int(version))
        log.info("%s now serves version %s in production", model_name, version)

    async def poll() -> None:
        while True:
            await asyncio.sleep(poll_interval_s)
            try:
                await reload_once()
            except Exception:  # never let one bad poll end hot reload
                log.exception("hot reload of %s failed", model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.draining = False
        await run_in_threadpool(repo.load_production)
        if repo.production is not None:
            metrics.production_version.labels(model_name).set(int(repo.production.version))
        if freeze_gc:
            # Everything allocated so far (modules, the session, ~63k objects) lives as long
            # as the process: out of the collector's sight, a full collection takes under
            # 0.02 ms instead of 17-25 ms (measured here), which showed up as the p99 latency.
            gc.collect()
            gc.freeze()
        poller = asyncio.create_task(poll()) if poll_interval_s > 0 else None
        try:
            yield
        finally:
            # uvicorn runs this after in-flight requests have finished.
            app.state.draining = True
            metrics.draining.set(1)
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            for batcher in list(batchers.values()):
                await batcher.close()
            await asyncio.to_thread(executor.shutdown, wait=True)

    app = FastAPI(title="kiln model server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.repository = repo
    app.state.registry = metrics.registry
    app.state.metrics = metrics
    app.state.draining = False
    app.state.reload_once = reload_once

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status_code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Whatever FastAPI validates is client input: V2 says 400, never 422.
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response, so the server still logs the traceback.
        return _error(500, "internal server error")

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        if app.state.draining:
            raise ApiError(503, "the server is shutting down")
        if repo.production is None:
            raise ApiError(503, f"model {model_name!r} has no production version loaded")
        return {"ready": True}

    async def _metadata(model: str, version: str | None) -> dict[str, Any]:
        predictor = await run_in_threadpool(repo.get, model, version)
        return predictor.metadata(versions=await run_in_threadpool(repo.versions))

    async def _ready(model: str, version: str | None) -> dict[str, Any]:
        # Loads a not yet used version: a client that checks readiness before inferring
        # gets an honest answer, and the load is not charged to its first request.
        predictor = await run_in_threadpool(repo.get, model, version)
        return {"name": predictor.name, "version": predictor.version, "ready": predictor.ready}

    async def _infer_endpoint(request: Request, model: str, version: str | None) -> Response:
        start = time.perf_counter()
        labels = (_UNKNOWN, _UNKNOWN)
        try:
            if version is None:
                predictor = repo.get(model)  # production: never blocks
            else:
                predictor = await run_in_threadpool(repo.get, model, version)
            labels = (predictor.name, predictor.version)
            batcher = batcher_for(predictor)
            with batcher.arriving():
                body = await _read_body(request, max_body_bytes)
                # Parsing a large JSON body is as CPU-bound as the model itself: off the
                # event loop, so health checks and other requests stay responsive. A small
                # one is parsed here: the hop to a thread and back (~50 us measured) would
                # cost about as much as parsing it (~60-70 us for one image).
                if len(body) <= INLINE_BODY_BYTES and "content-encoding" not in request.headers:
                    parsed, feed, wanted = _decode(predictor, body, request.headers, max_body_bytes)
                else:
                    parsed, feed, wanted = await run_in_threadpool(
                        _decode, predictor, body, request.headers, max_body_bytes
                    )
            try:
                result = await batcher.infer(feed)
            except InferenceInputError as e:
                raise ApiError(400, str(e)) from e
            metrics.queue.labels(*labels).observe(result.queue_s)
            if sum(a.size for a in result.outputs.values()) <= INLINE_OUTPUT_ELEMENTS:
                response = _encode(predictor, parsed, wanted, result.outputs)
            else:
                response = await run_in_threadpool(_encode, predictor, parsed, wanted, result.outputs)
        except ClientDisconnect:
            log.info("client went away while sending a request to %s version %s", *labels)
            response = _error(400, "client disconnected")
        except ApiError as e:
            response = _error(e.status_code, e.message)
        except InferenceError as e:
            log.error("inference failed on %s version %s: %s", *labels, e)
            response = _error(500, str(e))
        except Exception:
            # Caught here rather than by the app's handler so the request is still counted.
            log.exception("unhandled error in inference on %s version %s", *labels)
            response = _error(500, "internal server error")
        metrics.requests.labels(*labels, str(response.status_code)).inc()
        metrics.latency.labels(*labels).observe(time.perf_counter() - start)
        return response

    @app.get("/v2/models/{model}")
    async def model_metadata(model: str) -> dict[str, Any]:
        return await _metadata(model, None)

    @app.get("/v2/models/{model}/versions/{version}")
    async def version_metadata(model: str, version: str) -> dict[str, Any]:
        return await _metadata(model, version)

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> dict[str, Any]:
        return await _ready(model, None)

    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def version_ready(model: str, version: str) -> dict[str, Any]:
        return await _ready(model, version)

    async def infer(request: Request) -> Response:
        params = request.path_params
        return await _infer_endpoint(request, params["model"], params.get("version"))

    # Plain Starlette routes, matched first: the hot path skips FastAPI's dependency
    # solving and the scan past the other routes (server CPU per one-image request under
    # wrk went from ~456 to ~363 us here).
    # They take no typed parameters, so nothing is lost; the body is parsed by hand anyway.
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        app.router.routes.insert(0, Route(path, infer, methods=["POST"], include_in_schema=False))

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_settings(
    settings: ServerSettings,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """``create_app`` configured by ``settings``."""
    return create_app(
        settings.model_store,
        settings.model_name,
        max_body_bytes=settings.max_body_bytes,
        providers=providers_for(settings.device) if providers is None else providers,
        intra_op_threads=intra_op_threads,
        variant=settings.variant,
        batching=settings.batching,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        poll_interval_s=settings.poll_interval_s,
        keep_versions=settings.keep_versions,
        freeze_gc=freeze_gc,
    )


# --- the process ----------------------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain in front of its graceful shutdown.

    On the first SIGTERM (or SIGINT) readiness turns false at once; requests keep being
    served for ``drain_delay_s`` (SIGINT: no delay) so load balancers stop routing here;
    then uvicorn stops accepting, lets in-flight requests finish and runs the lifespan
    shutdown. A second signal exits without waiting. The signal is not re-raised after
    the shutdown, so a drained server exits 0.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_delay_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_delay_s = drain_delay_s
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.app.state.draining or self.should_exit:
            self.should_exit = True
            self.force_exit = True
            return
        log.info("signal %d: not ready any more, draining for %.1f s", sig, self.drain_delay_s)
        self.app.state.draining = True
        self.app.state.metrics.draining.set(1)
        if sig == signal.SIGTERM and self.drain_delay_s > 0:
            self._timer = threading.Timer(self.drain_delay_s, self._begin_shutdown)
            self._timer.daemon = True
            self._timer.start()
        else:
            self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        self.should_exit = True


def _env_name(field: str) -> str:
    return f"KILN_{field.upper()}"


def build_parser() -> argparse.ArgumentParser:
    """``kiln serve`` flags; every flag left out falls back to its ``KILN_*`` variable."""
    parser = argparse.ArgumentParser(
        prog="kiln serve",
        description="Serve the production model over KServe V2 REST.",
        argument_default=argparse.SUPPRESS,  # absent flags: the environment (pydantic-settings) decides
    )
    fields = ServerSettings.model_fields

    def add(*flags: str, field: str, **kwargs: Any) -> None:
        info = fields[field]
        kwargs.setdefault("type", info.annotation if info.annotation in (int, float, str) else None)
        if kwargs["type"] is None:
            del kwargs["type"]
        help_text = f"{info.description} (env {_env_name(field)}, default: {info.default})"
        parser.add_argument(*flags, dest=field, help=help_text, **kwargs)

    add("--store", "--model-store", field="model_store")
    add("--model", "--model-name", field="model_name")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    add("--max-body-bytes", field="max_body_bytes")
    add("--batching", field="batching", action=argparse.BooleanOptionalAction)
    add("--max-batch-size", field="max_batch_size")
    add("--max-queue-delay-us", field="max_queue_delay_us")
    add("--poll-interval-s", field="poll_interval_s")
    add("--keep-versions", field="keep_versions")
    add("--drain-delay-s", field="drain_delay_s")
    add("--graceful-timeout-s", field="graceful_timeout_s")
    add("--variant", field="variant", choices=["", "int8", "fp16", "int8_dynamic"])
    add("--device", field="device", choices=["auto", "cuda", "cpu"])
    add("--access-log", field="access_log", action=argparse.BooleanOptionalAction)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, str, int]:
    """(settings from ``KILN_*`` variables overridden by the flags in ``argv``, host, port)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    if not 0 <= port <= 65535:
        parser.error(f"--port {port} is not a port number")
    try:
        return ServerSettings(**args), host, port
    except ValidationError as e:
        parser.error(_describe(e))
        raise  # unreachable: error() exits


def load_settings(argv: list[str] | None = None) -> ServerSettings:
    """Settings from ``KILN_*`` variables, overridden by the flags in ``argv``."""
    return parse_args(argv)[0]


def main(argv: list[str] | None = None) -> int:
    """``kiln serve``: run the server until signalled. Returns 0, or 1 if startup failed."""
    settings, host, port = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app_from_settings(settings, freeze_gc=True)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # lifespan="on": a model that fails to load must stop the server, not be skipped.
        lifespan="on",
        log_level="info",
        # One log line per request costs more than a small model's inference; the
        # Prometheus counters already count requests by status. --access-log turns it on.
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(math.ceil(settings.graceful_timeout_s)),
    )
    server = DrainingServer(config, app, settings.drain_delay_s)
    try:
        server.run()
    except SystemExit:
        # uvicorn exits the process when the lifespan (loading the model) fails; main()
        # reports that as its return value instead, like every other kiln command.
        if server.started:
            raise
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
