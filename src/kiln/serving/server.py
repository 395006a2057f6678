"""The kiln model server: the KServe Open Inference Protocol (V2 REST) over ONNX Runtime.

One model name is served. Its ``production`` version is loaded at startup and answers
``/v2/models/{model}/...``; every stored version is also addressable (and loaded on first
use) under ``/v2/models/{model}/versions/{version}/...``. The production alias is read
once, at startup: a deployment moves it and then restarts (or rolls) the server, so one
process never changes what it serves underneath its clients.

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
import base64
import binascii
import io
import json
import logging
import math
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
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

from kiln import __version__
from kiln.contract import IMAGE_SIZE, INPUT_NAME
from kiln.serving.predictor import (
    V2_TO_NUMPY,
    InferenceError,
    InferenceInputError,
    ModelLoadError,
    OnnxPredictor,
    providers_from_env,
)
from kiln.store import ModelStore, StoreError

log = logging.getLogger(__name__)

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data"]
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
"""The extra BYTES input holding PNGs, decoded into the contract's ``pixels``."""

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
    """The served model's versions: production loaded at startup, the others on first use.

    ``get`` blocks (it may hash and load a model), so callers on the event loop run it in
    the thread pool. Versions are immutable in the store, so a loaded predictor stays valid.
    """

    def __init__(
        self,
        store: ModelStore,
        model_name: str,
        *,
        providers: Sequence[str],
        intra_op_threads: int | None = None,
    ) -> None:
        self.store = store
        self.model_name = model_name
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.production: OnnxPredictor | None = None
        self._predictors: dict[str, OnnxPredictor] = {}
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
        predictor = self._predictor(version)
        predictor.load()
        self.production = predictor

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
            if self.production is None:
                raise ApiError(503, f"model {model!r} has no production version loaded")
            return self.production
        if not version.isdigit() or version not in self.versions():
            raise ApiError(404, f"unknown version {version!r} of model {model!r}")
        predictor = self._predictor(version)
        try:
            predictor.load()
        except ModelLoadError as e:
            log.error("cannot load %s version %s: %s", model, version, e)
            raise ApiError(503, f"version {version} of model {model!r} cannot be loaded: {e}") from e
        return predictor

    def _predictor(self, version: str) -> OnnxPredictor:
        with self._lock:
            predictor = self._predictors.get(version)
            if predictor is None:
                try:
                    model_version = self.store.get(self.model_name, version)
                except StoreError as e:
                    raise ModelLoadError(str(e)) from e
                predictor = OnnxPredictor(
                    model_version, providers=self.providers, intra_op_threads=self.intra_op_threads
                )
                self._predictors[version] = predictor
            return predictor


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


def _infer(predictor: OnnxPredictor, body: bytes, headers: Mapping[str, str], limit: int) -> Response:
    """Decompress, decode, predict, encode: the blocking part of an inference request."""
    body = _decompress(body, headers.get("content-encoding"), limit)
    header, binary = _split_body(body, headers.get(HEADER_LENGTH))
    request = _parse_request(header)
    inputs = _decode_inputs(request, binary, predictor)
    wanted = _requested_outputs(request, predictor)
    try:
        results = predictor.predict(inputs, [name for name, _ in wanted])
    except InferenceInputError as e:
        raise ApiError(400, str(e)) from e
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


# --- the application ----------------------------------------------------------------------


def create_app(
    store_root: Path,
    model_name: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
) -> FastAPI:
    """The V2 application serving ``model_name`` from the model store at ``store_root``.

    Nothing is loaded until the application's lifespan starts (the production version
    then, other versions on first use). ``providers`` defaults to ``providers_from_env()``;
    ``intra_op_threads`` to the container's CPU quota. Each application has its own
    Prometheus registry, exposed at ``/metrics``.
    """
    repo = ModelRepository(
        ModelStore(store_root),
        model_name,
        providers=providers_from_env() if providers is None else providers,
        intra_op_threads=intra_op_threads,
    )

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    requests_total = Counter(
        "kiln_inference_requests",
        "Inference requests by model, version and HTTP status code.",
        ["model", "version", "code"],
        registry=registry,
    )
    latency = Histogram(
        "kiln_inference_request_duration_seconds",
        "Inference request latency, body read to response built.",
        ["model", "version"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(repo.load_production)
        yield

    app = FastAPI(title="kiln model server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.repository = repo
    app.state.registry = registry

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
            predictor = await run_in_threadpool(repo.get, model, version)
            labels = (predictor.name, predictor.version)
            body = await _read_body(request, max_body_bytes)
            # Parsing a large JSON body is as CPU-bound as the model itself: keep both
            # off the event loop so health checks and other requests stay responsive.
            response = await run_in_threadpool(_infer, predictor, body, request.headers, max_body_bytes)
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
        requests_total.labels(*labels, str(response.status_code)).inc()
        latency.labels(*labels).observe(time.perf_counter() - start)
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

    @app.post("/v2/models/{model}/infer")
    async def infer(request: Request, model: str) -> Response:
        return await _infer_endpoint(request, model, None)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def version_infer(request: Request, model: str, version: str) -> Response:
        return await _infer_endpoint(request, model, version)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln serve", description="Serve the production model over KServe V2 REST.")
    parser.add_argument(
        "--store",
        default=os.environ.get("KILN_MODEL_STORE", "model_store"),
        help="model store root (default: $KILN_MODEL_STORE or model_store)",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("KILN_MODEL_NAME", "mnist"),
        help="model name (default: $KILN_MODEL_NAME or mnist)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest accepted request body, after decompression (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``kiln serve``: run the server until interrupted. Returns 0, or 1 if startup failed."""
    args = build_parser().parse_args(argv)
    if args.max_body_bytes <= 0:
        build_parser().error("--max-body-bytes must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(Path(args.store), args.model, max_body_bytes=args.max_body_bytes)
    # lifespan="on": a model that fails to load must stop the server, not be skipped.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, lifespan="on", log_level="info"))
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
