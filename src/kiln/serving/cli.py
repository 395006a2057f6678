"""``kiln serve``: settings from flags and ``KILN_*`` variables, then uvicorn with a drain.

On SIGTERM readiness turns false at once, requests keep being served for
``drain_delay_s`` (so the load balancer stops sending), then in-flight requests finish
and the process exits 0.
"""

from __future__ import annotations

import errno
import logging
import math
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from kiln.errors import PortInUseError, StoreMissingError, UserError
from kiln.serving.app import ServingState, create_app_from_settings
from kiln.serving.codec import describe_validation_error
from kiln.serving.config import ServeCommand, ServerSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain in front of its graceful shutdown.

    On the first SIGTERM (or SIGINT) readiness turns false at once; requests keep being
    served for ``drain_delay_s`` (SIGINT: no delay) so load balancers stop routing here;
    then uvicorn stops accepting, lets in-flight requests finish and runs the lifespan
    shutdown. A second signal exits without waiting. The signal is not re-raised after
    the shutdown, so a drained server exits 0.
    """

    def __init__(self, config: uvicorn.Config, state: ServingState, drain_delay_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_delay_s = drain_delay_s
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self.should_exit:
            self.should_exit = True
            self.force_exit = True
            return
        log.info("signal %d: not ready any more, draining for %.1f s", sig, self.drain_delay_s)
        self.state.begin_drain()
        if sig == signal.SIGTERM and self.drain_delay_s > 0:
            self._timer = threading.Timer(self.drain_delay_s, self._begin_shutdown)
            self._timer.daemon = True
            self._timer.start()
        else:
            self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        self.should_exit = True


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, str, int]:
    """(settings from ``KILN_*`` variables overridden by the flags in ``argv``, host, port).

    A bad flag or value exits with status 2 and a one-line message, like argparse.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = ServeCommand(_cli_parse_args=argv)
    except ValidationError as e:
        print(f"kiln serve: error: {describe_validation_error(e)}", file=sys.stderr)
        raise SystemExit(2) from e
    return command.server_settings(), command.host, command.port


def load_settings(argv: list[str] | None = None) -> ServerSettings:
    """Settings from ``KILN_*`` variables, overridden by the flags in ``argv``."""
    return parse_args(argv)[0]


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (handed to uvicorn, so the port cannot be taken in
    between); PortInUseError when something already listens there."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {host} is already in use: stop what listens there or pass "
                                 "--port with a free one") from e
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host and --port") from e
    return sock


def main(argv: list[str] | None = None) -> int:
    """Run the server until signalled. Returns 0, or 1 if startup failed. A missing model
    store or a busy port raise a :class:`~kiln.errors.UserError` before anything loads."""
    settings, host, port = parse_args(argv)
    if not settings.model_store.is_dir():
        raise StoreMissingError(f"no model store at {settings.model_store}: pass --store with the store's folder "
                                "(`kiln run` creates model_store/ and deploys into it)")
    sock = listen_socket(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app: FastAPI = create_app_from_settings(settings, freeze_gc=True, host=host)
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
    server = DrainingServer(config, app.state.serving, settings.drain_delay_s)
    try:
        server.run(sockets=[sock])
    except SystemExit:
        # uvicorn exits the process when the lifespan (loading the model) fails; main()
        # reports that as its return value instead, like every other kiln command.
        if server.started:
            raise
    finally:
        sock.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
