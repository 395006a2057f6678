"""The KServe V2 REST codec: request bodies to validated model feeds, outputs to responses.

A request body is JSON (``$inference_request``), optionally followed by binary tensor
data per Triton's binary tensor data extension (``Inference-Header-Content-Length``
gives the JSON part's size), optionally gzip- or deflate-compressed. Numeric JSON data
is accepted only when the datatype holds it exactly; BYTES elements travel length
prefixed in binary data (``tritonclient.utils`` reads and writes that framing). Besides
the model's own inputs, a request may send ``image``: BYTES, shape ``[N]``, each element
a 28x28 PNG (raw bytes in binary mode, base64 text in JSON mode, since JSON strings
cannot carry arbitrary bytes); it is decoded to the contract's uint8 ``pixels``.

Everything the client got wrong raises :class:`~kiln.serving.errors.ApiError` with a
one-line message. Nothing here knows about routes, batching or the model repository.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.requests import Request
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from kiln.contract import IMAGE_SIZE, INPUT_NAME
from kiln.serving.errors import ApiError
from kiln.serving.predictor import V2_TO_NUMPY, InferenceError, InferenceInputError, OnnxPredictor

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
"""The extra BYTES input holding PNGs, decoded into the contract's ``pixels``."""

Wanted = list[tuple[str, bool]]
"""Requested outputs in response order: (output name, as binary data)."""


# --- the V2 inference request ($inference_request), validated by pydantic ---------------------

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



# --- request decoding ---------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
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


def decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
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


def parse_request(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        raise ApiError(400, f"invalid inference request: {describe_validation_error(e)}") from e


def describe_validation_error(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors(include_url=False)
    )


def _deserialize_bytes(chunk: memoryview, count: int, name: str) -> np.ndarray:
    try:
        elements = deserialize_bytes_tensor(chunk)
    except struct.error as e:  # a length prefix that is cut off or runs past the data
        raise ApiError(400, f"input {name!r}: malformed BYTES binary data ({e})") from e
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
            return _deserialize_bytes(chunk, count, inp.name).reshape(shape), offset + size
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


def decode_images(array: np.ndarray, from_json: bool) -> np.ndarray:
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


def bind_input(
    inputs: dict[str, np.ndarray], predictor: OnnxPredictor, name: str, datatype: str, array: np.ndarray,
    *, images_base64: bool,
) -> None:
    """Add one decoded request input to ``inputs`` under the model input it feeds.

    ``image`` (PNG files, base64 text when ``images_base64``) becomes the contract's
    ``pixels``; an unknown name, a datatype the model does not take, or a second input of
    the same name is an ApiError 400. Shared by the REST and gRPC front ends.
    """
    specs = {s.name: s for s in predictor.inputs}
    if name == IMAGE_INPUT and IMAGE_INPUT not in specs and INPUT_NAME in specs:
        if datatype != "BYTES":
            raise ApiError(400, f"input {IMAGE_INPUT!r} must be BYTES (PNG files)")
        array = decode_images(array, from_json=images_base64)
        name = INPUT_NAME
    elif name not in specs:
        raise ApiError(400, f"unknown input {name!r}; the model takes {sorted(specs)}")
    elif datatype != specs[name].datatype:
        raise ApiError(400, f"input {name!r} is {specs[name].datatype}, the request says {datatype}")
    if name in inputs:
        raise ApiError(400, f"input {name!r} given more than once")
    inputs[name] = array


def _decode_inputs(request: InferenceRequest, binary: memoryview, predictor: OnnxPredictor) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for inp in request.inputs:
        array, offset = _decode_input(inp, binary, offset)
        from_text = inp.parameters.get("binary_data_size") is None
        bind_input(inputs, predictor, inp.name, inp.datatype, array, images_base64=from_text)
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return inputs


def _requested_outputs(request: InferenceRequest, predictor: OnnxPredictor) -> Wanted:
    default_binary = request.parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ApiError(400, "parameter binary_data_output must be true or false")
    if request.outputs is None:
        return [(s.name, default_binary) for s in predictor.outputs]
    known = {s.name for s in predictor.outputs}
    wanted: Wanted = []
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


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        serialized = serialize_byte_tensor(np.asarray(array, dtype=object))
        return serialized.item() if serialized.size else b""
    return np.ascontiguousarray(array, dtype=V2_TO_NUMPY[datatype]).tobytes()


def _to_json(array: np.ndarray, datatype: str, name: str) -> list[Any] | np.ndarray:
    """An output's ``data``: flat, row-major; numbers stay a numpy array (orjson writes it directly)."""
    if datatype == "BYTES":
        return [x if isinstance(x, str) else bytes(x).decode("utf-8", "replace") for x in array.ravel()]
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # JSON has no NaN or infinity: never let one turn silently into null
        raise InferenceError(f"output {name!r} contains NaN or infinity, which JSON cannot carry (ask for binary_data)")
    return np.ascontiguousarray(array.ravel())


def dumps(payload: Any) -> bytes:
    """Compact JSON (orjson, numpy arrays written natively: no per-element Python objects)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_request(
    predictor: OnnxPredictor, body: bytes, headers: Mapping[str, str], limit: int
) -> tuple[InferenceRequest, dict[str, np.ndarray], Wanted]:
    """Decompress, parse, decode and validate: (request, model feed, wanted outputs)."""
    body = decompress(body, headers.get("content-encoding"), limit)
    header, binary = _split_body(body, headers.get(HEADER_LENGTH))
    request = parse_request(header)
    inputs = _decode_inputs(request, binary, predictor)
    wanted = _requested_outputs(request, predictor)
    return request, validated_feed(predictor, inputs), wanted


def validated_feed(predictor: OnnxPredictor, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model feed of decoded ``inputs`` (REST and gRPC alike): the predictor's checks,
    a failed one as a 400 (INVALID_ARGUMENT over gRPC)."""
    try:
        return predictor.validate(inputs)
    except InferenceInputError as e:
        raise ApiError(400, str(e)) from e


def encode_response(
    predictor: OnnxPredictor, request: InferenceRequest, wanted: Wanted, results: Mapping[str, np.ndarray]
) -> Response:
    """The V2 response (JSON, or JSON + binary tensor data) for the ``wanted`` outputs."""
    datatypes = {s.name: s.datatype for s in predictor.outputs}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, as_binary in wanted:
        array, datatype = results[name], datatypes[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if as_binary:
            blob = to_binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(array, datatype, name)
        outputs.append(entry)
    payload: dict[str, Any] = {"model_name": predictor.name, "model_version": predictor.version}
    if request.id is not None:
        payload["id"] = request.id
    payload["outputs"] = outputs
    if not blobs:
        return Response(dumps(payload), media_type="application/json")
    json_part = dumps(payload)
    return Response(
        json_part + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(json_part))},
    )


def error_response(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the server answers: ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)

