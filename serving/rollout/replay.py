"""Replay held-out data as inference traffic, for rollouts with no live traffic.

Where it sits: locally nobody calls a freshly deployed model, so the analysis would have
nothing to judge. :class:`TrafficReplayer` sends the held-out rows, in a loop, as Open
Inference Protocol V2 requests to the router while the engine runs, and keeps the client's
view of every answer (so tests can assert what users saw).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

__all__ = ["ReplayStats", "TrafficReplayer"]


@dataclass(frozen=True)
class ReplayStats:
    sent: int
    by_status: dict[int, int]
    """HTTP status -> count; 0 stands for "no answer" (connection error, timeout)."""
    by_backend: dict[str, int]
    """Which side answered, from the router's ``x-kubeml-backend`` header."""

    @property
    def failures(self) -> int:
        return sum(n for status, n in self.by_status.items() if status != 200)


class TrafficReplayer:
    """Loops over ``rows`` sending V2 infer requests from ``concurrency`` threads.

    ``rate_per_s`` caps the total request rate (None: as fast as the server answers; on a
    small shared machine a cap keeps the replay from starving the servers it measures).
    """

    def __init__(
        self,
        url: str,
        model: str,
        rows: Any,
        *,
        concurrency: int = 2,
        batch_size: int = 1,
        rate_per_s: float | None = 50.0,
        datatype: str = "FP32",
        timeout_s: float = 30.0,
        token: str | None = None,
    ):
        self.rows = np.asarray(rows)
        if self.rows.ndim < 2 or len(self.rows) == 0:
            raise ValueError("replay rows must be a non-empty (N, ...) array")
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be >= 1")
        self.endpoint = f"{url.rstrip('/')}/v2/models/{model}/infer"
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.rate_per_s = rate_per_s
        self.datatype = datatype
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        """Sent with every request when the servers need an inference token."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._status: Counter[int] = Counter()
        self._backend: Counter[str] = Counter()
        self._next = 0

    def _body(self) -> dict:
        with self._lock:
            start = self._next
            self._next = (self._next + self.batch_size) % len(self.rows)
        index = np.arange(start, start + self.batch_size) % len(self.rows)
        batch = self.rows[index]
        return {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": self.datatype,
                    "data": batch.reshape(-1).tolist(),
                }
            ]
        }

    def _worker(self) -> None:
        interval = self.concurrency / self.rate_per_s if self.rate_per_s else 0.0
        with requests.Session() as session:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    r = session.post(self.endpoint, json=self._body(), headers=self._headers, timeout=self.timeout_s)
                    status, backend = r.status_code, r.headers.get("x-kubeml-backend", "")
                except requests.RequestException:
                    status, backend = 0, ""
                with self._lock:
                    self._status[status] += 1
                    if backend:
                        self._backend[backend] += 1
                if interval:
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    else:
                        next_at = time.monotonic()

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._worker, name=f"kubeml-replay-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        self._threads = []

    def stats(self) -> ReplayStats:
        with self._lock:
            return ReplayStats(
                sent=sum(self._status.values()),
                by_status=dict(self._status),
                by_backend=dict(self._backend),
            )

    def __enter__(self) -> TrafficReplayer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
