"""What every stage shares: opening the environment, and the retry policy.

A stage takes the environment config as JSON (a KFP parameter) and the run id, opens the
artifact store and the run ledger, and records itself there. :func:`run_stage` is the one
place a stage is retried: only a retryable error (:func:`kubeml.errors.is_retryable`) is
tried again, after a backoff; a configuration mistake or a bad dataset fails the run at
once with its message.

The orchestrator may retry a step too (KFP's ``set_retry``, meant for a lost pod), and it
cannot tell errors apart. So a failure that no retry can fix (a non-retryable error, or a
retryable one after the stage's own retries ran out) is recorded with ``retryable: false``
and the inputs' fingerprint; an orchestrator retry of the same step with the same inputs,
within :data:`PERMANENT_FAILURE_MEMORY_S`, fails at once with that error instead of
repeating the work.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kubeml.artifacts import ArtifactStore
from kubeml.config import EnvironmentConfig
from kubeml.errors import StageFailed, is_retryable
from kubeml.ledger import Ledger, StageRecord

__all__ = ["NO_RETRY", "PERMANENT_FAILURE_MEMORY_S", "RetryPolicy", "StageContext", "open_stage", "run_stage"]

T = TypeVar("T")

#: Seconds a recorded permanent failure refuses a retry of the same step. KFP retries within
#: seconds to minutes of the failure; a run re-submitted later under the same id (after a
#: fix elsewhere, say a restored bucket) runs the stage again.
PERMANENT_FAILURE_MEMORY_S = 3600.0


@dataclass(frozen=True)
class StageContext:
    """The environment, artifact store and ledger of one stage of one run."""

    cfg: EnvironmentConfig
    store: ArtifactStore
    ledger: Ledger
    run_id: str


    inputs_sha256: str = ""
    """Fingerprint of the config and the stage's arguments."""


def open_stage(config_json: str, run_id: str, *args: Any) -> StageContext:
    """Validate ``config_json`` and open the store and ledger it names.

    ``args`` are the stage's other inputs; with the config they make the fingerprint that
    tells an orchestrator retry of this step from a run with other inputs.
    """
    cfg = EnvironmentConfig.model_validate_json(config_json)
    store = cfg.artifact_store.open()
    digest = hashlib.sha256(json.dumps([config_json, run_id, *args], default=str).encode()).hexdigest()
    return StageContext(cfg, store, Ledger(store, run_id), run_id, digest)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a stage is tried again after a retryable failure, and how long it waits."""

    retries: int = 0
    """Attempts after the first; 0: no retry."""
    backoff_s: float = 60.0
    """Seconds before the first retry. 60 s lets a restarting apiserver, a throttled S3 or a
    rescheduled Ray worker come back; shorter retries mostly meet the same outage."""
    factor: float = 2.0
    """Each later wait is this much longer (60 s, then 120 s)."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.factor < 1:
            raise ValueError(
                f"RetryPolicy needs retries >= 0, backoff_s >= 0 and factor >= 1; got {self.retries}, "
                f"{self.backoff_s}, {self.factor}"
            )

    def delay_s(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return self.backoff_s * self.factor ** (retry - 1)


NO_RETRY = RetryPolicy()


def run_stage(
    name: str,
    ctx: StageContext,
    body: Callable[[StageRecord, int], T],
    *,
    policy: RetryPolicy = NO_RETRY,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """Run ``body(record, attempt)`` inside the ledger record of stage ``name``.

    A retryable error is retried up to ``policy.retries`` times, each attempt recorded in the
    ledger (``attempt``, and the error with ``retryable: true``) and announced on the step's
    log; any other error, or the last attempt's, propagates at once.
    """
    previous = ctx.ledger.read(name)
    if (
        previous.status == "failed"
        and previous.retryable is False
        and ctx.inputs_sha256
        and previous.inputs_sha256 == ctx.inputs_sha256
        and time.time() - (previous.finished or 0.0) < PERMANENT_FAILURE_MEMORY_S
    ):
        # Not recorded again: the ledger keeps the original error, with its traceback.
        raise StageFailed(f"{name} failed on attempt {previous.attempt} with an error no retry can fix:\n"
                          f"{previous.error or previous.message}")
    attempt = 1
    while True:
        try:
            with ctx.ledger.stage(name, attempt=attempt, inputs_sha256=ctx.inputs_sha256) as rec:
                return body(rec, attempt)
        except BaseException as exc:
            if attempt > policy.retries or not is_retryable(exc):
                if is_retryable(exc):  # retries ran out: an orchestrator retry would only repeat them
                    rec = ctx.ledger.read(name)
                    rec.retryable = False
                    ctx.ledger.write(rec)
                raise
            wait = policy.delay_s(attempt)
            print(f"{name}: attempt {attempt} failed ({type(exc).__name__}: {exc}); "
                  f"retrying in {wait:.0f} s", flush=True)  # the step's log
            sleep(wait)
            attempt += 1
