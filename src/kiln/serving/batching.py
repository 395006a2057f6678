"""Dynamic batching: concurrent requests to one model version merged into one inference.

A request's validated feed goes into the version's asyncio queue. A worker forms a batch
as soon as an inference slot is free: it takes every request already queued, and holds
the batch open (at most ``max_queue_delay_s`` after it took the first request) only while
other requests have been announced (``arriving``: their bodies are being read or decoded)
and the batch is below ``max_batch_size`` rows. So a lone request is never delayed, and
under load requests gather by themselves while the slots are busy. The inputs are
concatenated along axis 0, run once in the executor (never on the event loop), and the
outputs split back by each request's row count. Requests whose inputs disagree on the
non-batch dimensions never share a batch. When a merged batch fails, its requests are run
one by one, so each gets its own answer or its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.serving.predictor import InferenceError, OnnxPredictor

log = logging.getLogger(__name__)

BatchObserver = Callable[[int, int, float], None]
"""Called per inference run with (requests, rows, compute seconds)."""


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float


@dataclass
class _Item:
    feed: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[InferResult]
    enqueued: float = field(default_factory=time.perf_counter)


def _key(feed: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feed.items()))


def _rows(feed: Mapping[str, np.ndarray]) -> int:
    counts = {a.shape[0] for a in feed.values()}
    if len(counts) != 1:
        raise ValueError("inputs disagree on the batch dimension")
    return counts.pop()


def run_one(predictor: OnnxPredictor, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """(all outputs, compute seconds) of one unbatched run; errors as ``OnnxPredictor.run``."""
    start = time.perf_counter()
    outputs = predictor.run(feed)
    return outputs, time.perf_counter() - start


class Batcher:
    """The queue and worker of one loaded model version. Use from the event loop only."""

    def __init__(
        self,
        predictor: OnnxPredictor,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_concurrent_batches: int = 2,
        observe: BatchObserver | None = None,
    ) -> None:
        # Weakly: the server maps predictors to batchers in a WeakKeyDictionary, so an
        # evicted version is freed; every request using it holds it strongly meanwhile.
        self._predictor = weakref.ref(predictor)
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.observe = observe
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._arriving = 0

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request whose feed is being prepared (body read, decode) for this batcher.

        While any request is announced, a batch that is not full waits (up to the queue
        delay) for it; with none announced a batch is dispatched at once. Leave the block
        right before calling ``infer`` (no ``await`` in between), or on error.
        """
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    @property
    def predictor(self) -> OnnxPredictor:
        predictor = self._predictor()
        if predictor is None:
            raise InferenceError("the model version was unloaded")
        return predictor

    async def infer(self, feed: dict[str, np.ndarray]) -> InferResult:
        """All outputs of the model for ``feed`` (validated by ``OnnxPredictor.validate``).

        Raises what ``OnnxPredictor.run`` raises for this request's own inputs.
        """
        loop = asyncio.get_running_loop()
        if not self.predictor.batchable or not feed:
            start = time.perf_counter()
            outputs, compute = await loop.run_in_executor(self.executor, run_one, self.predictor, feed)
            self._observe(1, next(iter(feed.values())).shape[0] if feed else 0, compute)
            return InferResult(outputs, time.perf_counter() - start - compute, compute)
        item = _Item(feed, _rows(feed), _key(feed), loop.create_future())
        self._queue.put_nowait(item)
        if self._worker is None:
            # The worker exits when the queue runs dry; the next request starts another.
            self._worker = loop.create_task(self._work())
        return await item.future

    async def close(self) -> None:
        """Wait for queued and running batches to finish."""
        while self._worker is not None or self._running:
            tasks = ([self._worker] if self._worker is not None else []) + list(self._running)
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, requests: int, rows: int, compute_s: float) -> None:
        if self.observe is not None:
            self.observe(requests, rows, compute_s)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Item | None = None
        batch: list[_Item] = []  # taken from the queue, not yet handed to a _run task
        try:
            while carry is not None or not self._queue.empty():
                # A free slot first: while every slot is busy requests keep queueing, and
                # the batch formed when one frees takes them all.
                await self._slots.acquire()
                try:
                    first = carry if carry is not None else self._queue.get_nowait()
                    carry = None
                    batch, rows = [first], first.rows
                    deadline = loop.time() + self.max_queue_delay_s
                    while rows < self.max_batch_size:
                        if self._queue.empty():
                            timeout = deadline - loop.time()
                            if self._arriving == 0 or timeout <= 0:
                                break  # nobody else is on the way: waiting only adds latency
                            try:
                                nxt = await asyncio.wait_for(self._queue.get(), timeout)
                            except TimeoutError:
                                break
                        else:
                            nxt = self._queue.get_nowait()
                        if nxt.key != first.key or rows + nxt.rows > self.max_batch_size:
                            carry = nxt  # starts the next batch
                            break
                        batch.append(nxt)
                        rows += nxt.rows
                except BaseException:
                    self._slots.release()
                    raise
                task = loop.create_task(self._run(batch))  # releases the slot when done
                batch = []
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            self._worker = None
            # Only when cancelled: fail what was taken rather than leave it hanging.
            for item in [*batch, *([carry] if carry is not None else [])]:
                if not item.future.done():
                    item.future.set_exception(InferenceError("the batcher stopped"))

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            start = time.perf_counter()
            if len(batch) == 1:
                await self._run_alone(batch[0], start)
                return
            feed = {name: np.concatenate([item.feed[name] for item in batch]) for name in batch[0].feed}
            total = sum(item.rows for item in batch)
            try:
                outputs, compute = await loop.run_in_executor(self.executor, run_one, self.predictor, feed)
                if any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
                    raise InferenceError("an output does not follow the batch dimension")
            except Exception as e:
                log.warning("a batch of %d requests failed (%s): running them one by one", len(batch), e)
                for item in batch:
                    await self._run_alone(item, start)
                return
            self._observe(len(batch), total, compute)
            offset = 0
            for item in batch:
                part = {name: a[offset : offset + item.rows] for name, a in outputs.items()}
                offset += item.rows
                if not item.future.done():  # the client may have gone away
                    item.future.set_result(InferResult(part, start - item.enqueued, compute))
        except BaseException as e:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e if isinstance(e, Exception) else InferenceError("cancelled"))
            if not isinstance(e, Exception):
                raise
        finally:
            self._slots.release()

    async def _run_alone(self, item: _Item, start: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            outputs, compute = await loop.run_in_executor(self.executor, run_one, self.predictor, item.feed)
        except Exception as e:
            if not item.future.done():
                item.future.set_exception(e)
            return
        self._observe(1, item.rows, compute)
        if not item.future.done():
            item.future.set_result(InferResult(outputs, start - item.enqueued, compute))
