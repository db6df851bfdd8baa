"""Adaptive batching: concurrent requests to one model share one forward pass.

Where it sits: a model class (``model.py``) hands each request's validated feature rows to
:meth:`AdaptiveBatcher.submit` and gets back exactly its own rows of the outputs.
``kubeml.serving.server`` turns batching on (``--batch-max-size``,
``--batch-max-latency-ms``). This module knows nothing about protocols or web frameworks: it is asyncio plus numpy, so
REST V1, REST V2 and gRPC requests all coalesce in the same queue.

Policy, for ``max_batch_size=N`` rows and ``max_latency_ms=T``:

* requests queue in arrival order; a batch is flushed as soon as the queued rows reach
  ``N``, or when the oldest queued request has waited ``T`` ms, whichever comes first;
* a batch takes whole requests from the head of the queue while their rows fit in ``N``
  (a request is never split); a request that alone has more than ``N`` rows is run as a
  batch of its own;
* one batch runs at a time, in a worker thread, so the event loop keeps answering health
  checks; requests that arrive meanwhile form the next batch (batches grow with load);
* a request cancelled while queued (its deadline passed) is dropped before it costs a
  forward pass; one cancelled while its batch runs just discards its rows;
* when the forward pass fails, every request of that batch gets a :class:`BatchFailed`
  naming the batch, and the batcher carries on with the next one.

Example (``run`` maps a ``(rows, features)`` array to outputs with the same row count)::

    >>> import asyncio, numpy as np
    >>> batcher = AdaptiveBatcher(lambda x: (x.sum(axis=1),), max_batch_size=8, max_latency_ms=5)
    >>> async def two_requests():
    ...     a, b = np.ones((2, 3)), np.full((1, 3), 2.0)
    ...     return await asyncio.gather(batcher.submit(a), batcher.submit(b))
    >>> [out[0].tolist() for out in asyncio.run(two_requests())]
    [[3.0, 3.0], [6.0]]
    >>> batcher.batches_run, batcher.rows_run
    (1, 3)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["AdaptiveBatcher", "BatchFailed", "BatchingConfig"]

log = logging.getLogger("kubeml.serving.batching")


@dataclass(frozen=True)
class BatchingConfig:
    """How requests are coalesced; see the module docstring for the policy."""

    max_batch_size: int
    """Most rows (instances summed over requests) in one forward pass. A single request
    with more rows still runs, alone; the per-request limit is the model's own."""
    max_latency_ms: float = 5.0
    """Longest time the oldest queued request waits for others, in ms. 5 ms is a few
    forward passes of a small CNN: enough for a burst to coalesce, small next to network
    latency. 0 flushes at once (only requests queued behind a running batch coalesce)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, got {self.max_batch_size!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"batch max size must be >= 1 row, got {self.max_batch_size}")
        if not math.isfinite(self.max_latency_ms) or self.max_latency_ms < 0:
            raise ValueError(
                f"batch max latency must be a finite number of ms >= 0, got {self.max_latency_ms}"
            )


class BatchFailed(RuntimeError):
    """The forward pass of a coalesced batch failed; raised to each of its requests."""

    def __init__(self, message: str, *, rows: int = 0, requests: int = 0):
        super().__init__(message)
        self.rows = rows
        self.requests = requests

    def __reduce__(self) -> Any:
        return (_rebuild_batch_failed, (str(self), self.rows, self.requests))


def _rebuild_batch_failed(message: str, rows: int, requests: int) -> BatchFailed:
    return BatchFailed(message, rows=rows, requests=requests)


@dataclass(eq=False)
class _Pending:
    features: np.ndarray
    future: asyncio.Future
    enqueued: float  # loop.time()

    @property
    def rows(self) -> int:
        return len(self.features)


class AdaptiveBatcher:
    """Coalesces concurrent :meth:`submit` calls into calls of ``run``.

    ``run(features) -> outputs`` is synchronous and runs in ``executor`` (a worker
    thread; the event loop's default executor when None). ``features`` is the requests'
    rows concatenated along axis 0; ``outputs`` is a sequence of arrays (or one array)
    whose first dimension equals the row count. Each caller gets a tuple of its own
    slices, in its own row order.

    The batcher binds to the event loop of its first :meth:`submit`; :meth:`close`
    (from that loop) fails whatever is still queued.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], Any],
        *,
        max_batch_size: int,
        max_latency_ms: float = BatchingConfig.max_latency_ms,
        executor: concurrent.futures.Executor | None = None,
        name: str = "model",
    ):
        self.config = BatchingConfig(max_batch_size, max_latency_ms)
        self.run = run
        self.executor = executor
        self.name = name
        self.batches_run = 0
        """Forward passes started so far (successful or not)."""
        self.rows_run = 0
        """Rows in those forward passes."""
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0  # may include cancelled requests not yet popped
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def max_latency_s(self) -> float:
        return self.config.max_latency_ms / 1000

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (cancelled ones included until dropped)."""
        return len(self._queue)

    async def submit(self, features: np.ndarray) -> tuple[np.ndarray, ...]:
        """Queue one request's rows; return its rows of every output once its batch ran.

        Raises :class:`BatchFailed` when its batch's forward pass fails, and
        ``RuntimeError`` after :meth:`close`. Cancelling the caller withdraws the request.
        """
        if self._closed:
            raise RuntimeError(f"batcher of {self.name!r} is closed (the model was stopped)")
        if not isinstance(features, np.ndarray) or features.ndim < 1 or len(features) < 1:
            raise ValueError("submit() takes an array of at least one row, (rows, *features)")
        loop = asyncio.get_running_loop()
        self._bind(loop)
        assert self._wakeup is not None
        future = loop.create_future()
        self._queue.append(_Pending(features, future, loop.time()))
        self._queued_rows += len(features)
        self._wakeup.set()
        # Awaiting the future directly: cancelling the caller cancels the future, which
        # tells the worker to skip (or discard) this request.
        return await future

    def close(self) -> None:
        """Stop the worker and fail queued requests; call from the batcher's event loop."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    RuntimeError(f"model {self.name!r} stopped before this request ran")
                )
        self._queued_rows = 0

    # -- worker ------------------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop and self._worker is not None and not self._worker.done():
            return
        if self._loop is not None and self._loop is not loop and self._queue:
            if not self._loop.is_closed():
                raise RuntimeError(
                    f"batcher of {self.name!r} is serving another event loop; "
                    "use one batcher per loop"
                )
            self._queue.clear()  # futures of a closed loop can never be awaited again
            self._queued_rows = 0
        if self._loop is not loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._work(), name=f"kubeml-batcher-{self.name}")
        self._worker.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the loop above must not leave callers waiting forever.
        exc = task.exception()
        log.error("batcher of %s stopped: %s: %s", self.name, type(exc).__name__, exc)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    BatchFailed(f"batcher of model {self.name!r} failed: {exc}")
                )
        self._queued_rows = 0

    async def _work(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        loop, wakeup = self._loop, self._wakeup
        while True:
            self._drop_cancelled_head()
            if not self._queue:
                wakeup.clear()
                await wakeup.wait()
                continue
            deadline = self._queue[0].enqueued + self.max_latency_s
            while self._queued_rows < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except TimeoutError:
                    break
                self._drop_cancelled_head()
                if not self._queue:
                    break
            batch = self._take()
            if batch:
                await self._run(batch)

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queued_rows -= self._queue.popleft().rows

    def _take(self) -> list[_Pending]:
        """Whole requests from the head while they fit; an oversize head goes alone."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled while queued: costs nothing
                self._queued_rows -= self._queue.popleft().rows
                continue
            if batch and rows + head.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= head.rows
            batch.append(head)
            rows += head.rows
            if rows >= self.max_batch_size:
                break
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        rows = sum(p.rows for p in batch)
        self.batches_run += 1
        self.rows_run += rows
        started = time.perf_counter()
        try:
            features = (
                batch[0].features if len(batch) == 1
                else np.concatenate([p.features for p in batch], axis=0)
            )  # fmt: skip
            assert self._loop is not None
            outputs = await self._loop.run_in_executor(self.executor, self.run, features)
            outputs = _as_outputs(outputs, rows)
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(
                        RuntimeError(f"model {self.name!r} stopped while this request ran")
                    )
            raise
        except Exception as exc:
            log.error(
                "batch of %d rows from %d requests to %s failed: %s: %s",
                rows, len(batch), self.name, type(exc).__name__, exc,
            )  # fmt: skip
            for p in batch:
                if not p.future.done():
                    failure = BatchFailed(
                        f"inference on model {self.name!r} failed for a batch of {rows} rows "
                        f"from {len(batch)} requests: {type(exc).__name__}: {exc}",
                        rows=rows,
                        requests=len(batch),
                    )
                    failure.__cause__ = exc
                    p.future.set_exception(failure)
            return
        log.debug(
            "batch of %d rows from %d requests ran in %.2f ms",
            rows, len(batch), (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        start = 0
        for p in batch:
            end = start + p.rows
            if not p.future.done():  # done: cancelled (timed out) while the batch ran
                p.future.set_result(tuple(o[start:end] for o in outputs))
            start = end


def _as_outputs(outputs: Any, rows: int) -> tuple[np.ndarray, ...]:
    if isinstance(outputs, np.ndarray):
        outputs = (outputs,)
    if not isinstance(outputs, Sequence) or not outputs:
        raise TypeError(
            f"run() must return an array or a sequence of arrays, got {type(outputs).__name__}"
        )
    arrays = tuple(np.asarray(o) for o in outputs)
    for i, a in enumerate(arrays):
        if a.ndim < 1 or len(a) != rows:
            raise ValueError(
                f"run() output {i} has shape {list(a.shape)}; expected {rows} rows "
                "(one per input row)"
            )
    return arrays
