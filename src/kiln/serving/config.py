"""Server configuration: ``KILN_*`` environment variables, overridden by ``kiln serve`` flags.

Every field of ``ServerSettings`` is read from the environment variable ``KILN_<FIELD>``
(``model_store`` from ``KILN_MODEL_STORE``, ``batching`` from ``KILN_BATCHING``...); the
command line flag of the same name (``--model-store``, or the historical ``--store``)
wins over the environment.

``--host`` and ``--port`` are flags only: Kubernetes injects ``<SERVICE>_PORT=tcp://...``
into every pod for each Service, so a Service named ``kiln`` would otherwise set ``KILN_PORT``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kiln.runtime import SessionSettings

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class ServerSettings(BaseSettings):
    """Everything ``kiln serve`` can be told; see the module docstring for the sources."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", protected_namespaces=())

    model_store: Path = Field(Path("model_store"), description="model store root")
    model_name: str = Field("mnist", min_length=1, description="model name")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, description="largest request body, after decompression")
    batching: bool = Field(True, description="merge concurrent requests to one version into one inference")
    max_batch_size: int = Field(64, ge=1, description="most rows (first-dimension elements) in a merged batch")
    max_queue_delay_us: int = Field(
        500, ge=0, description="longest a batch is held open for requests already being received "
        "(a lone request never waits)"
    )
    poll_interval_s: float = Field(2.0, ge=0, description="how often the production alias is checked (0: never)")
    keep_versions: int = Field(3, ge=1, description="loaded versions kept in memory (production included)")
    drain_delay_s: float = Field(
        5.0, ge=0, description="after SIGTERM: seconds of not-ready but still serving before connections close"
    )
    graceful_timeout_s: float = Field(20.0, gt=0, description="after the drain: longest wait for in-flight requests")
    variant: Literal["", "int8", "fp16", "int8_dynamic"] = Field(
        "", description="serve each version's stored variant of this name ('' = fp32 model.onnx; "
        "versions without it serve fp32)"
    )
    access_log: bool = Field(False, description="log one line per request (uvicorn's access log)")
    # KILN_GRPC_PORT is safe from Kubernetes' service links: the Service is kiln-serve
    # (KILN_SERVE_PORT...); a Service named kiln-grpc would clash.
    grpc_port: int | None = Field(
        8081, ge=0, le=65535, description="KServe V2 gRPC port, on the same host (0 or none: no gRPC)"
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="ONNX Runtime device (auto: CUDA when the NVIDIA driver sees a GPU)"
    )

    def session_settings(self) -> SessionSettings:
        """How ONNX Runtime runs the served model (intra-op threads: the CPU quota)."""
        return SessionSettings(device=self.device)


FLAG_ONLY = frozenset({"host", "port"})
"""``ServeCommand`` fields never read from the environment (see the module docstring)."""


class ServeCommand(ServerSettings):
    """Serve the production model over KServe V2 REST and gRPC.

    Every flag left out falls back to its KILN_* environment variable (--max-batch-size:
    KILN_MAX_BATCH_SIZE, --store: KILN_MODEL_STORE), then to its default; --host and
    --port are flags only.
    """

    model_config = SettingsConfigDict(
        cli_prog_name="kiln serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_shortcuts={"model-store": "store", "model-name": "model"},
    )

    host: str = Field("127.0.0.1", description="bind address (flag only)")
    port: int = Field(8080, ge=0, le=65535, description="port (flag only)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[Any, ...]:
        def env_without_flag_only() -> dict[str, Any]:
            return {k: v for k, v in env_settings().items() if k not in FLAG_ONLY}

        return init_settings, env_without_flag_only, dotenv_settings, file_secret_settings

    def server_settings(self) -> ServerSettings:
        """The ``ServerSettings`` part, as its own (already validated) object."""
        return ServerSettings.model_construct(**self.model_dump(exclude=set(FLAG_ONLY)))
