"""Run ledger: one JSON record per pipeline stage, kept in the artifact store.

Stages run in other processes (kfp.local subprocesses, pods on a cluster); the ledger is
how they report to whoever watches the run - the CLI's progress display, the summary
table, a later ``kubeml runs show``. Keys::

    runs/RUN_ID/run.json              what was asked (environment, code version, started)
    runs/RUN_ID/stages/STAGE.json     status, start/finish times, duration, outputs, error
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from kubeml.artifacts import ArtifactStore
from kubeml.errors import ArtifactNotFound, ConfigError, KubemlError, is_retryable

__all__ = ["STAGES", "Ledger", "StageRecord"]

#: Pipeline stages in order; the CLI shows one line each.
STAGES = ("ingest", "validate", "train", "evaluate", "gate", "register", "deploy")


@dataclass
class StageRecord:
    stage: str
    status: str = "pending"
    """pending | running | succeeded | failed | skipped"""
    started: float | None = None
    finished: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    """One line for people: what happened, or why it failed."""
    error: str = ""
    """Full error text (with traceback for unexpected errors)."""
    retryable: bool | None = None
    """On failure: whether the error may go away on a retry (:func:`kubeml.errors.is_retryable`)."""
    attempt: int = 1
    """Which attempt of the stage this record is (the stage runner retries retryable errors)."""
    inputs_sha256: str = ""
    """Fingerprint of the stage's inputs (config and arguments): tells a retry of the same
    step apart from a later run of the same stage with other inputs."""

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


class Ledger:
    def __init__(self, store: ArtifactStore, run_id: str):
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ConfigError(f"invalid run id {run_id!r}: use letters, digits, '-' and '_' (no '/', no leading '.')")
        self.store = store
        self.run_id = run_id
        self.prefix = f"runs/{run_id}"

    def write_run(self, info: dict[str, Any]) -> None:
        self.store.put_text(f"{self.prefix}/run.json", json.dumps(info, indent=2, default=str))

    def write(self, rec: StageRecord) -> None:
        self.store.put_text(f"{self.prefix}/stages/{rec.stage}.json", json.dumps(asdict(rec), indent=2, default=str))

    def read(self, stage: str) -> StageRecord:
        try:
            d = json.loads(self.store.get_text(f"{self.prefix}/stages/{stage}.json"))
        except ArtifactNotFound:
            return StageRecord(stage=stage)
        return StageRecord(**d)

    def all(self) -> list[StageRecord]:
        return [self.read(s) for s in STAGES]

    @contextmanager
    def stage(self, name: str, *, attempt: int = 1, inputs_sha256: str = "") -> Iterator[StageRecord]:
        """Record a stage: running on entry; succeeded or failed (with the error) on exit."""
        rec = StageRecord(stage=name, status="running", started=time.time(), attempt=attempt,
                          inputs_sha256=inputs_sha256)
        self.write(rec)
        try:
            yield rec
        except KubemlError as exc:
            rec.status, rec.finished = "failed", time.time()
            rec.message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rec.error = str(exc)
            rec.retryable = is_retryable(exc)
            self.write(rec)
            raise
        except BaseException as exc:
            rec.status, rec.finished = "failed", time.time()
            rec.message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            rec.error = traceback.format_exc()
            rec.retryable = False
            self.write(rec)
            raise
        else:
            if rec.status == "running":
                rec.status = "succeeded"
            rec.finished = time.time()
            self.write(rec)
