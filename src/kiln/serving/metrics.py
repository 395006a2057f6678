"""The server's Prometheus metrics, in a registry of its own (one per application)."""

from __future__ import annotations

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

UNKNOWN = "_unknown"
"""Model and version label for names the client made up: keeps label sets bounded."""

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own (one per application)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._request_metrics(registry)
        self._model_metrics(registry)

    def _request_metrics(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kiln_inference_requests",
            "Inference requests by model, version and HTTP status code.",
            ["model", "version", "code"],
            registry=registry,
        )
        self.grpc_requests = Counter(
            "kiln_grpc_inference_requests",
            "gRPC ModelInfer calls by model, version and gRPC status code name (OK, INVALID_ARGUMENT...).",
            ["model", "version", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "kiln_inference_request_duration_seconds",
            "Inference request latency (total, REST and gRPC), request read to response built.",
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

    def _model_metrics(self, registry: CollectorRegistry) -> None:
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

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition of every metric."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_load(self, model: str, version: str, ok: bool) -> None:
        self.loads.labels(model, version, "success" if ok else "failure").inc()
