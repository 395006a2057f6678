"""The KServe V2 gRPC front end: ``inference.GRPCInferenceService`` over the REST server's state.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with
the messages and service stubs ``tritonclient[grpc]`` generates from the protocol's
``grpc_service.proto`` (``tritonclient.grpc.service_pb2``): no framing is written here.

It runs as a ``grpc.aio`` server on the application's own event loop, started and
stopped by :class:`~kiln.serving.app.ServingState`: the dynamic batcher's queues belong
to that loop, so a gRPC request and a REST request for the same version share one
batch, one model repository (versions, hot reload), one set of Prometheus metrics and
one drain. A second process or thread would need its own batcher, or a hop between
loops on every request.

Input tensors come as typed ``contents`` or as ``raw_input_contents`` (one little-endian
blob per input, BYTES length-prefixed, all inputs or none). Outputs go back as
``raw_output_contents`` when the request sent raw inputs (what ``tritonclient.grpc``
does and reads) or sets the request parameter ``binary_data_output``; otherwise as
typed ``contents``. Client errors map to INVALID_ARGUMENT (what was sent), NOT_FOUND
(unknown model or version), RESOURCE_EXHAUSTED (over the size limit), UNAVAILABLE (no
version loaded, or shutting down); INTERNAL is kept for failures of the server itself.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from starlette.concurrency import run_in_threadpool
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import deserialize_bytes_tensor

from kiln import __version__
from kiln.serving import codec
from kiln.serving.errors import ApiError
from kiln.serving.metrics import UNKNOWN
from kiln.serving.predictor import V2_TO_NUMPY, InferenceError, InferenceInputError, OnnxPredictor

if TYPE_CHECKING:
    from kiln.serving.app import ServingState

log = logging.getLogger(__name__)

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data"]
INLINE_MESSAGE_BYTES = 64 * 1024
"""Requests up to this size are decoded on the event loop (as REST bodies are)."""
INLINE_OUTPUT_ELEMENTS = 4096

STATUS_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
"""The REST layer's ApiError status -> the gRPC status code of the same meaning."""

CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""``InferTensorContents`` field per V2 datatype (FP16 has none: raw contents only)."""


def status_of(error: ApiError) -> grpc.StatusCode:
    return STATUS_FOR_HTTP.get(error.status_code, grpc.StatusCode.INVALID_ARGUMENT)


# --- decoding ------------------------------------------------------------------------------


def _shape(tensor: Any) -> tuple[tuple[int, ...], int]:
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ApiError(400, f"input {tensor.name!r}: shape {list(shape)} has a negative dimension")
    return shape, math.prod(shape)


def _typed(tensor: Any, dtype: np.dtype[Any], shape: tuple[int, ...], count: int) -> np.ndarray:
    """An input's typed ``contents`` as an array of ``dtype``; values must fit it exactly."""
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise ApiError(400, f"input {tensor.name!r}: {tensor.datatype} travels in raw_input_contents only")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise ApiError(
            400, f"input {tensor.name!r}: {len(values)} values in contents.{field}, shape {list(shape)} holds {count}"
        )
    if tensor.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.array(values, dtype=np.uint64 if field in ("uint_contents", "uint64_contents") else None)
    if dtype.kind in "iu" and count:
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise ApiError(400, f"input {tensor.name!r}: values outside the {tensor.datatype} range")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    return wide.astype(dtype).reshape(shape)


def _raw(tensor: Any, blob: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], count: int) -> np.ndarray:
    if tensor.datatype == "BYTES":
        try:
            elements = deserialize_bytes_tensor(blob)
        except struct.error as e:  # a length prefix cut off or running past the data
            raise ApiError(400, f"input {tensor.name!r}: malformed BYTES raw contents ({e})") from e
        if len(elements) != count:
            raise ApiError(400, f"input {tensor.name!r} holds {len(elements)} BYTES elements, its shape says {count}")
        return elements.reshape(shape)
    if len(blob) != count * dtype.itemsize:
        raise ApiError(400, f"input {tensor.name!r}: {len(blob)} raw bytes for shape {list(shape)} {tensor.datatype}")
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def decode_inputs(request: Any, predictor: OnnxPredictor) -> dict[str, np.ndarray]:
    """The request's inputs by model input name (ApiError 400 for anything malformed)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ApiError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs (one each, or none)")
    if not request.inputs:
        raise ApiError(400, "the request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        dtype = V2_TO_NUMPY.get(tensor.datatype)
        if dtype is None:
            raise ApiError(400, f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
        if "shared_memory_region" in tensor.parameters:
            raise ApiError(400, "shared memory inputs are not supported")
        shape, count = _shape(tensor)
        if raw:
            if tensor.HasField("contents"):
                raise ApiError(400, f"input {tensor.name!r} has both contents and raw_input_contents")
            array = _raw(tensor, raw[i], dtype, shape, count)
        else:
            array = _typed(tensor, dtype, shape, count)
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise ApiError(400, f"input {tensor.name!r} contains NaN or infinity")
        codec.bind_input(inputs, predictor, tensor.name, tensor.datatype, array, images_base64=False)
    return inputs


def _parameter(params: Any, key: str) -> bool:
    if key not in params:
        return False
    value = params[key]
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise ApiError(400, f"parameter {key} must be a bool_param")
    return value.bool_param


def requested_outputs(request: Any, predictor: OnnxPredictor) -> tuple[list[str], bool]:
    """(output names in response order, answer in raw_output_contents)."""
    datatypes = {s.name: s.datatype for s in predictor.outputs}
    raw = bool(request.raw_input_contents) or _parameter(request.parameters, "binary_data_output")
    if not request.outputs:
        names = list(datatypes)
    else:
        names = []
        for out in request.outputs:
            if out.name not in datatypes:
                raise ApiError(400, f"unknown output {out.name!r}; the model has {sorted(datatypes)}")
            if out.name in names:
                raise ApiError(400, f"output {out.name!r} requested more than once")
            if "classification" in out.parameters:
                raise ApiError(400, "the classification extension is not supported")
            if "shared_memory_region" in out.parameters:
                raise ApiError(400, "shared memory outputs are not supported")
            names.append(out.name)
    # a datatype without a typed field (FP16) forces raw for the whole response
    raw = raw or any(datatypes[n] not in CONTENTS_FIELD for n in names)
    return names, raw


def decode_request(request: Any, predictor: OnnxPredictor) -> tuple[dict[str, np.ndarray], list[str], bool]:
    """(validated model feed, wanted outputs, raw outputs)."""
    inputs = decode_inputs(request, predictor)
    wanted, raw = requested_outputs(request, predictor)
    return codec.validated_feed(predictor, inputs), wanted, raw


def encode_response(
    request: Any, predictor: OnnxPredictor, wanted: list[str], raw: bool, results: dict[str, np.ndarray]
) -> Any:
    datatypes = {s.name: s.datatype for s in predictor.outputs}
    response = pb.ModelInferResponse(model_name=predictor.name, model_version=predictor.version, id=request.id)
    for name in wanted:
        array, datatype = results[name], datatypes[name]
        out = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(codec.to_binary(array, datatype))
        elif datatype == "BYTES":
            out.contents.bytes_contents.extend(x if isinstance(x, bytes) else str(x).encode() for x in array.ravel())
        else:
            getattr(out.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
    return response


# --- the service ---------------------------------------------------------------------------


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six V2 calls; the other Triton extensions answer UNIMPLEMENTED (the base class)."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        state = self.state
        return pb.ServerReadyResponse(ready=not state.draining and state.repository.production is not None)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def _get(self, name: str, version: str, context: grpc.aio.ServicerContext) -> OnnxPredictor:
        try:
            return await run_in_threadpool(self.state.repository.get, name, version or None)
        except ApiError as e:
            await context.abort(status_of(e), e.message)
            raise  # abort raises; this line only satisfies the type checker

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        predictor = await self._get(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=predictor.ready)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        predictor = await self._get(request.name, request.version, context)
        meta = predictor.metadata(versions=await run_in_threadpool(self.state.repository.versions))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One inference, counted and timed in the metrics whatever happens."""
        start = time.perf_counter()
        labels = [UNKNOWN, UNKNOWN]
        code, message, response = grpc.StatusCode.OK, "", None
        try:
            response = await self._infer(request, labels)
        except ApiError as e:
            code, message = status_of(e), e.message
        except InferenceError as e:
            log.error("inference failed on %s version %s: %s", *labels, e)
            code, message = grpc.StatusCode.INTERNAL, str(e)
        except Exception:
            log.exception("unhandled error in gRPC inference on %s version %s", *labels)
            code, message = grpc.StatusCode.INTERNAL, "internal server error"
        metrics = self.state.metrics
        metrics.grpc_requests.labels(*labels, code.name).inc()
        metrics.latency.labels(*labels).observe(time.perf_counter() - start)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)
        return response

    async def _infer(self, request: Any, labels: list[str]) -> Any:
        predictor = await self.state.predictor(request.model_name, request.model_version or None)
        labels[:] = [predictor.name, predictor.version]
        batcher = self.state.batcher_for(predictor)
        with batcher.arriving():
            if request.ByteSize() <= INLINE_MESSAGE_BYTES:
                feed, wanted, raw = decode_request(request, predictor)
            else:
                feed, wanted, raw = await run_in_threadpool(decode_request, request, predictor)
        try:
            result = await batcher.infer(feed)
        except InferenceInputError as e:
            raise ApiError(400, str(e)) from e
        self.state.metrics.queue.labels(*labels).observe(result.queue_s)
        outputs = {n: result.outputs[n] for n in wanted}
        if sum(a.size for a in outputs.values()) <= INLINE_OUTPUT_ELEMENTS:
            return encode_response(request, predictor, wanted, raw, outputs)
        return await run_in_threadpool(encode_response, request, predictor, wanted, raw, outputs)


class GrpcFrontEnd:
    """The gRPC server of one :class:`ServingState`, on ``host:port`` (port 0: any free one)."""

    def __init__(self, state: ServingState, host: str, port: int, max_message_bytes: int) -> None:
        self.state = state
        self.address = f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Bind and serve; RuntimeError when the address cannot be bound."""
        server = grpc.aio.server(
            options=[
                # a larger message is refused by gRPC itself with RESOURCE_EXHAUSTED
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                # gRPC sets SO_REUSEPORT by default: a second server on a taken port
                # would start without error and split the traffic. Fail instead.
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.state), server)
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise RuntimeError(f"cannot serve gRPC on {self.address}: {e}") from e
        await server.start()
        self._server = server
        log.info("serving KServe V2 gRPC on %s", self.address.rsplit(":", 1)[0] + f":{self.port}")

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls (UNAVAILABLE), let in-flight ones finish for up to ``grace_s``."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
