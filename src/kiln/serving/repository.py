"""The served model's versions: the production alias, an LRU of loaded versions, hot reload.

One model name is served. Its ``production`` version is loaded at startup; every stored
version is also addressable (loaded on first use), the last ``keep_versions`` loaded ones
staying in memory. :class:`Reloader` polls the production alias: when it moves, the new
version is loaded in the background (checksum, session, warm-up) and then swapped in
atomically; a version that fails to load is logged and counted, and the old one keeps
serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from kiln.runtime import SessionSettings
from kiln.serving.errors import ApiError
from kiln.serving.metrics import ServerMetrics
from kiln.serving.predictor import ModelLoadError, OnnxPredictor
from kiln.store import ModelStore, StoreError

log = logging.getLogger(__name__)


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
        session: SessionSettings | None = None,
        keep_versions: int = 3,
        on_load: Callable[[str, bool], None] | None = None,
        variant: str = "",
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.store = store
        self.model_name = model_name
        self.session = SessionSettings() if session is None else session
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
                predictor = OnnxPredictor(model_version, session=self.session, variant=self.variant)
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


class Reloader:
    """Follows the production alias of ``repository`` every ``interval_s`` (0: never).

    A new alias target is loaded in the thread pool and swapped in once it is ready. A
    target that fails to load is not retried every poll; moving the alias away and back
    retries it.
    """

    def __init__(self, repository: ModelRepository, metrics: ServerMetrics, interval_s: float) -> None:
        self.repository = repository
        self.metrics = metrics
        self.interval_s = interval_s
        self.failed: str | None = None
        """The alias target that last failed to load."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling on the running event loop (nothing when ``interval_s`` is 0)."""
        if self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def serve(self, predictor: OnnxPredictor) -> None:
        """Make the loaded ``predictor`` production and say so in the metrics."""
        self.repository.set_production(predictor)
        self.metrics.production_version.labels(self.repository.model_name).set(int(predictor.version))

    async def reload_once(self) -> None:
        """Follow the production alias once: load a new target, swap it in if it loads."""
        repo, name = self.repository, self.repository.model_name
        try:
            version = await run_in_threadpool(repo.store.alias, name)
        except StoreError as e:
            log.error("cannot read the production alias of %s: %s", name, e)
            return
        current = repo.production
        if version is None:
            return
        if current is not None and current.version == version:
            self.failed = None  # moved back: a later move to the failed version retries it
            return
        if version == self.failed:
            return
        log.info("production alias of %s moved to version %s: loading it", name, version)
        try:
            predictor = await run_in_threadpool(repo.load_version, version)
        except ModelLoadError as e:
            self.failed = version
            log.error("version %s of %s cannot be loaded, still serving %s: %s",
                      version, name, current.version if current else "nothing", e)
            return
        self.failed = None
        self.serve(predictor)
        log.info("%s now serves version %s in production", name, version)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.reload_once()
            except Exception:  # never let one bad poll end hot reload
                log.exception("hot reload of %s failed", self.repository.model_name)
