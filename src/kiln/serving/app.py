"""The V2 REST application: routes over one :class:`ServingState`.

Routes: ``/v2`` (server metadata), ``/v2/health/live|ready``, ``/v2/models/{model}``
(metadata), ``.../ready``, ``.../infer``, each also under
``/v2/models/{model}/versions/{version}/``, and ``/metrics``. The production version
answers unversioned paths; other stored versions are loaded on first use.

Concurrent requests to one version are merged into one inference (dynamic batching, see
:mod:`kiln.serving.batching`); inference runs in an executor so health probes always
answer. Any error is answered as ``{"error": "..."}`` (see :mod:`kiln.serving.errors`);
client input never yields a 5xx. ``ServingState.begin_drain()`` turns readiness false
(the process does so on SIGTERM, see :mod:`kiln.serving.cli`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from kiln import __version__
from kiln.runtime import SessionSettings
from kiln.serving import codec
from kiln.serving.batching import Batcher
from kiln.serving.config import DEFAULT_MAX_BODY_BYTES, ServerSettings
from kiln.serving.errors import ApiError
from kiln.serving.metrics import UNKNOWN, ServerMetrics
from kiln.serving.predictor import InferenceError, InferenceInputError, OnnxPredictor
from kiln.serving.repository import ModelRepository, Reloader
from kiln.store import ModelStore

log = logging.getLogger(__name__)

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data"]

INLINE_BODY_BYTES = 64 * 1024
"""Identity-encoded request bodies up to this size are decoded on the event loop."""
INLINE_OUTPUT_ELEMENTS = 4096
"""Responses of up to this many output elements are encoded on the event loop."""


class ServingState:
    """What one application serves with: the repository and its reloader, the metrics,
    one batcher per loaded version, the inference threads, and the drain flag.

    Protocol front ends share it: a route resolves ``predictor()``, feeds
    ``batcher_for(predictor)`` and counts in ``metrics``; ``draining`` answers readiness.
    """

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        *,
        max_body_bytes: int,
        batching: bool,
        max_batch_size: int,
        max_queue_delay_us: int,
        poll_interval_s: float,
        freeze_gc: bool,
        grpc_address: tuple[str, int] | None = None,
        graceful_timeout_s: float = 20.0,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.reloader = Reloader(repository, metrics, poll_interval_s)
        self.max_body_bytes = max_body_bytes
        self.max_batch_size = max_batch_size if batching else 1
        self.max_queue_delay_s = max_queue_delay_us / 1e6 if batching else 0.0
        self.freeze_gc = freeze_gc
        self.draining = False
        # Inference runs here, off the event loop and apart from the request thread pool.
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-infer")
        self._batchers: weakref.WeakKeyDictionary[OnnxPredictor, Batcher] = weakref.WeakKeyDictionary()
        self.grpc_address = grpc_address
        """(host, port) of the KServe V2 gRPC front end started with the app (None: none)."""
        self.graceful_timeout_s = graceful_timeout_s
        self.grpc: Any = None  # the running kiln.serving.grpc_service.GrpcFrontEnd

    @property
    def model_name(self) -> str:
        return self.repository.model_name

    def begin_drain(self) -> None:
        """Answer not ready from now on; requests are still served."""
        self.draining = True
        self.metrics.draining.set(1)

    async def startup(self) -> None:
        """Load the production version, then start following its alias."""
        await run_in_threadpool(self.repository.load_production)
        production = self.repository.production
        if production is not None:
            self.metrics.production_version.labels(self.model_name).set(int(production.version))
        if self.freeze_gc:
            # Everything allocated so far (modules, the session) lives as long as the
            # process: out of the collector's sight, full collections stay short instead
            # of walking it all, which otherwise shows up in the p99 latency.
            gc.collect()
            gc.freeze()
        self.reloader.start()
        if self.grpc_address is not None:
            # Imported here: an application without gRPC never loads grpcio.
            from kiln.serving.grpc_service import GrpcFrontEnd

            host, port = self.grpc_address
            self.grpc = GrpcFrontEnd(self, host, port, self.max_body_bytes)
            await self.grpc.start()

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()  # uvicorn runs this after in-flight requests have finished

    async def shutdown(self) -> None:
        """Stop hot reload, finish queued batches, stop the inference threads."""
        self.begin_drain()
        if self.grpc is not None:
            # In-flight gRPC calls finish (new ones get UNAVAILABLE) before the batchers close.
            await self.grpc.stop(self.graceful_timeout_s)
        await self.reloader.stop()
        for batcher in list(self._batchers.values()):
            await batcher.close()
        await asyncio.to_thread(self.executor.shutdown, wait=True)

    def batcher_for(self, predictor: OnnxPredictor) -> Batcher:
        batcher = self._batchers.get(predictor)
        if batcher is None:
            labels = (predictor.name, predictor.version)

            def observe(requests: int, rows: int, compute_s: float) -> None:
                self.metrics.batch_requests.labels(*labels).observe(requests)
                self.metrics.batch_rows.labels(*labels).observe(rows)
                self.metrics.compute.labels(*labels).observe(compute_s)

            batcher = Batcher(
                predictor,
                self.executor,
                max_batch_size=self.max_batch_size,
                max_queue_delay_s=self.max_queue_delay_s,
                observe=observe,
            )
            self._batchers[predictor] = batcher
        return batcher

    async def predictor(self, model: str, version: str | None) -> OnnxPredictor:
        """The loaded predictor (ApiError 404/503, see ``ModelRepository.get``)."""
        if version is None:
            return self.repository.get(model)  # production: never blocks
        return await run_in_threadpool(self.repository.get, model, version)

    async def infer(self, request: Request, model: str, version: str | None) -> Response:
        """Answer one V2 infer request, counted and timed in the metrics whatever happens."""
        start = time.perf_counter()
        labels = [UNKNOWN, UNKNOWN]
        try:
            response = await self._infer(request, model, version, labels)
        except ClientDisconnect:
            log.info("client went away while sending a request to %s version %s", *labels)
            response = codec.error_response(400, "client disconnected")
        except ApiError as e:
            response = codec.error_response(e.status_code, e.message)
        except InferenceError as e:
            log.error("inference failed on %s version %s: %s", *labels, e)
            response = codec.error_response(500, str(e))
        except Exception:
            # Caught here rather than by the app's handler so the request is still counted.
            log.exception("unhandled error in inference on %s version %s", *labels)
            response = codec.error_response(500, "internal server error")
        self.metrics.requests.labels(*labels, str(response.status_code)).inc()
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
        return response

    async def _infer(self, request: Request, model: str, version: str | None, labels: list[str]) -> Response:
        """The response to a request; fills ``labels`` (the metrics' model and version) once known."""
        predictor = await self.predictor(model, version)
        labels[:] = [predictor.name, predictor.version]
        batcher = self.batcher_for(predictor)
        with batcher.arriving():
            body = await codec.read_body(request, self.max_body_bytes)
            # Parsing a large JSON body is as CPU-bound as the model itself: off the event
            # loop, so health checks and other requests stay responsive. A small one is
            # parsed here, where the hop to a thread and back would cost about as much as
            # the parse itself.
            args = (predictor, body, request.headers, self.max_body_bytes)
            if len(body) <= INLINE_BODY_BYTES and "content-encoding" not in request.headers:
                parsed, feed, wanted = codec.decode_request(*args)
            else:
                parsed, feed, wanted = await run_in_threadpool(codec.decode_request, *args)
        try:
            result = await batcher.infer(feed)
        except InferenceInputError as e:
            raise ApiError(400, str(e)) from e
        self.metrics.queue.labels(*labels).observe(result.queue_s)
        if sum(a.size for a in result.outputs.values()) <= INLINE_OUTPUT_ELEMENTS:
            return codec.encode_response(predictor, parsed, wanted, result.outputs)
        return await run_in_threadpool(codec.encode_response, predictor, parsed, wanted, result.outputs)


# --- routes -----------------------------------------------------------------------------------

router = APIRouter()


def _state(request: Request) -> ServingState:
    return request.app.state.serving


@router.get("/", include_in_schema=False)
async def demo_page(request: Request) -> HTMLResponse:
    """The draw-a-digit page (kiln.html): it posts to this server's V2 infer endpoint."""
    from kiln.html import demo_page as render_demo

    return HTMLResponse(render_demo(_state(request).model_name))


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> dict[str, bool]:
    state = _state(request)
    if state.draining:
        raise ApiError(503, "the server is shutting down")
    if state.repository.production is None:
        raise ApiError(503, f"model {state.model_name!r} has no production version loaded")
    return {"ready": True}


async def _metadata(request: Request, model: str, version: str | None) -> dict[str, Any]:
    state = _state(request)
    predictor = await run_in_threadpool(state.repository.get, model, version)
    return predictor.metadata(versions=await run_in_threadpool(state.repository.versions))


async def _model_ready(request: Request, model: str, version: str | None) -> dict[str, Any]:
    # Loads a not yet used version: a client that checks readiness before inferring gets
    # an honest answer, and the load is not charged to its first request.
    predictor = await run_in_threadpool(_state(request).repository.get, model, version)
    return {"name": predictor.name, "version": predictor.version, "ready": predictor.ready}


@router.get("/v2/models/{model}")
async def model_metadata(request: Request, model: str) -> dict[str, Any]:
    return await _metadata(request, model, None)


@router.get("/v2/models/{model}/versions/{version}")
async def version_metadata(request: Request, model: str, version: str) -> dict[str, Any]:
    return await _metadata(request, model, version)


@router.get("/v2/models/{model}/ready")
async def model_ready(request: Request, model: str) -> dict[str, Any]:
    return await _model_ready(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/ready")
async def version_ready(request: Request, model: str, version: str) -> dict[str, Any]:
    return await _model_ready(request, model, version)


@router.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    body, content_type = _state(request).metrics.exposition()
    return Response(body, media_type=content_type)


async def infer(request: Request) -> Response:
    params = request.path_params
    return await _state(request).infer(request, params["model"], params.get("version"))


INFER_PATHS = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class KilnApp(FastAPI):
    """FastAPI, with the infer POST answered before its middleware stack.

    On that path nothing of the stack is used: ``ServingState.infer`` turns every error
    into its response and counts it itself, and the request is parsed by hand. Each
    middleware layer (error handling, exception routing, exit stacks, body limits) wraps
    ``receive`` and ``send`` once more, which on a small model costs as much CPU as the
    inference. Everything else goes through FastAPI as usual.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["app"] = self
                response = await self.state.serving.infer(Request(scope, receive), match[1], match[2])
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


# --- errors -----------------------------------------------------------------------------------


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return codec.error_response(exc.status_code, exc.message)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return codec.error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Whatever FastAPI validates is client input: V2 says 400, never 422.
    return codec.error_response(400, f"invalid request: {exc.errors()}")


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this response, so the server still logs the traceback.
    return codec.error_response(500, "internal server error")


# --- the application --------------------------------------------------------------------------


def create_app(
    store_root: Path,
    model_name: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    session: SessionSettings | None = None,
    intra_op_threads: int | None = None,
    batching: bool = True,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 500,
    poll_interval_s: float = 2.0,
    keep_versions: int = 3,
    variant: str = "",
    freeze_gc: bool = False,
    grpc_port: int | None = None,
    grpc_host: str = "127.0.0.1",
    graceful_timeout_s: float = 20.0,
) -> FastAPI:
    """The V2 application serving ``model_name`` from the model store at ``store_root``.

    Nothing is loaded until the application's lifespan starts (the production version
    then, other versions on first use). ``session`` is how ONNX Runtime runs each version
    (default ``SessionSettings()``: device auto, intra-op threads = the CPU quota);
    ``intra_op_threads`` overrides its thread count. ``poll_interval_s`` 0 turns hot
    reload off. ``variant`` (e.g. ``int8``) serves each version's stored variant of that
    name where it has one. Each application has its own Prometheus registry.
    ``freeze_gc`` moves every object alive once the production version is loaded out of
    the garbage collector's reach (``gc.freeze``): for a server process of its own, not
    for an application embedded in a longer-lived process. ``grpc_port`` (None: off)
    starts the KServe V2 gRPC front end (:mod:`kiln.serving.grpc_service`) on
    ``grpc_host`` with the application, sharing its repository, batching, metrics and
    drain; at shutdown its in-flight calls get up to ``graceful_timeout_s``.
    """
    if max_body_bytes <= 0 or max_batch_size < 1 or max_queue_delay_us < 0 or poll_interval_s < 0:
        raise ValueError("max_body_bytes and max_batch_size must be positive, delays not negative")
    session = SessionSettings() if session is None else session
    if intra_op_threads is not None:
        session = SessionSettings.model_validate({**session.model_dump(), "intra_op_threads": intra_op_threads})
    metrics = ServerMetrics()
    repository = ModelRepository(
        ModelStore(store_root),
        model_name,
        session=session,
        keep_versions=keep_versions,
        on_load=lambda version, ok: metrics.observe_load(model_name, version, ok),
        variant=variant,
    )
    metrics.production_version.labels(model_name).set(0)
    state = ServingState(
        repository, metrics, max_body_bytes=max_body_bytes, batching=batching, max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us, poll_interval_s=poll_interval_s, freeze_gc=freeze_gc,
        grpc_address=None if grpc_port is None else (grpc_host, grpc_port), graceful_timeout_s=graceful_timeout_s,
    )

    return _application(state)


def _application(state: ServingState) -> FastAPI:
    app = KilnApp(
        title="kiln model server", version=__version__, lifespan=state.lifespan, docs_url=None, redoc_url=None
    )
    app.state.serving = state
    app.state.repository = state.repository
    for exc_class, handler in (
        (ApiError, _api_error),
        (StarletteHTTPException, _http_error),
        (RequestValidationError, _validation_error),
        (Exception, _internal_error),
    ):
        app.add_exception_handler(exc_class, handler)  # type: ignore[arg-type]
    app.include_router(router)
    # Plain Starlette routes, matched first (KilnApp answers these paths before routing;
    # the routes keep them in the application's route table and its 405s).
    for path in INFER_PATHS:
        app.router.routes.insert(0, Route(path, infer, methods=["POST"], include_in_schema=False))
    return app


def create_app_from_settings(settings: ServerSettings, *, freeze_gc: bool = False, host: str = "127.0.0.1") -> FastAPI:
    """``create_app`` configured by ``settings`` (gRPC, when on, binds ``host`` too)."""
    return create_app(
        settings.model_store,
        settings.model_name,
        max_body_bytes=settings.max_body_bytes,
        session=settings.session_settings(),
        variant=settings.variant,
        batching=settings.batching,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        poll_interval_s=settings.poll_interval_s,
        keep_versions=settings.keep_versions,
        freeze_gc=freeze_gc,
        grpc_port=settings.grpc_port or None,
        grpc_host=host,
        graceful_timeout_s=settings.graceful_timeout_s,
    )
