"""The fault-injection hook of a model server: make a healthy model look like a bad version.

Where it sits: in ``kubeml.serving.telemetry``; the server's ``--fault-error-rate`` /
``--fault-latency-ms`` build a :class:`FaultInjection`. The ASGI middleware and the gRPC
interceptor answer the injected errors (:class:`ErrorSchedule` spreads them evenly); the
injected latency is spent inside the request deadline by the server's data plane. Used by
rollout tests and game days only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["ErrorSchedule", "FaultInjection"]


@dataclass(frozen=True)
class FaultInjection:
    """Fault-injection hook for rollout tests and game days; off unless set.

    Only inference routes are affected; health, metadata and ``/metrics`` stay truthful so
    that the fault looks like a bad model, not a dead server.
    """

    error_rate: float = 0.0
    """Share of inference requests failed at once, before the model sees them: HTTP 503,
    gRPC ``UNAVAILABLE``; spread evenly per protocol (0.5: every other one)."""
    latency_ms: float = 0.0
    """Delay, in milliseconds, added to every inference request that reaches the model
    (not to injected errors, which answer at once). It is spent inside the request
    deadline, as a slow forward pass would be, so ``--request-timeout-s`` or a client's
    shorter deadline cuts it short with 504 / ``DEADLINE_EXCEEDED``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"fault error_rate must be in [0, 1], got {self.error_rate}")
        if self.latency_ms < 0:
            raise ValueError(f"fault latency_ms must be >= 0, got {self.latency_ms}")

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.latency_ms > 0


class ErrorSchedule:
    """Which requests an injected error rate fails: evenly spread, thread-safe.

    >>> schedule = ErrorSchedule(0.5)
    >>> [schedule.next_fails() for _ in range(4)]
    [False, True, False, True]
    """

    def __init__(self, rate: float):
        self.rate = rate
        self._count = 0
        self._lock = threading.Lock()

    def next_fails(self) -> bool:
        """Whether the next request gets the injected error."""
        if self.rate <= 0:
            return False
        with self._lock:
            n = self._count
            self._count += 1
        # Request n fails when the running share of failures would fall below the rate.
        return int((n + 1) * self.rate) > int(n * self.rate)
