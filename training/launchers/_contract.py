"""What a training job hands back: the result record and the outcome records of a launch.

Where it sits: the shared vocabulary of :mod:`kubeml.training.launchers`. A cluster job
(``python -m kubeml.training.ray_main`` inside a KubeRay ``RayJob`` or an ACK SageMaker
``TrainingJob``) runs the same :func:`~kubeml.training.fit.fit` as a local run and writes, in
the artifact store:

- ``models/RUN_ID/bundle``: the model bundle. The train stage returns this key; evaluate and
  register read the bundle from it, exactly as after a local run.
- ``checkpoints/RUN_ID/...``: the Ray Train checkpoints (resume after spot loss or a retry).
- ``runs/RUN_ID/train/result.json`` (:func:`write_result`): bundle key, final and best
  checkpoint URIs, epochs, per-epoch history. The step that launched the job reads it back
  (:func:`read_result`) for its ledger record.

So the store must be one both the job's pods and the step can reach: ``s3://`` (a
``file://`` store would be each pod's own disk; it is refused before anything is created).

:class:`JobOutcome` is a finished Kubernetes job, :class:`ClusterTrainResult` what a cluster
run left in the store, and :class:`TrainOutcome` what every launcher (local or cluster)
returns to the train stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubeml.errors import JobError

if TYPE_CHECKING:
    from kubeml.artifacts import ArtifactStore
    from kubeml.training.fit import TrainResult

__all__ = [
    "ClusterTrainResult",
    "JobOutcome",
    "TrainOutcome",
    "read_result",
    "result_key",
    "write_result",
]


@dataclass(frozen=True)
class JobOutcome:
    """A job that finished successfully."""

    kind: str
    name: str
    namespace: str
    status: str
    """Final status text."""
    transitions: tuple[str, ...]
    """Every status line seen, in order (the first is the state found on creation or adoption)."""
    adopted: bool = False
    """The job existed already (a retried step) and was followed instead of created."""
    replaced: bool = False
    """A failed job of the same name was deleted and created again."""
    model_artifacts: str = ""
    """SageMaker's ``modelArtifacts.s3ModelArtifacts`` (``/opt/ml/model`` as uploaded); empty for RayJob."""
    wall_s: float = 0.0

    def record(self) -> dict[str, Any]:
        """The job as the train stage's ledger record keeps it (plain JSON; ``wall_s`` as ``wait_s``)."""
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name, "status": self.status,
                "transitions": list(self.transitions), "adopted": self.adopted, "replaced": self.replaced,
                "wait_s": self.wall_s, "model_artifacts": self.model_artifacts}


@dataclass(frozen=True)
class ClusterTrainResult:
    """What a training run on a cluster left in the artifact store (see the module's contract)."""

    run_id: str
    bundle_key: str
    bundle_uri: str
    checkpoint_uri: str
    best_checkpoint_uri: str
    epochs: int
    history: tuple[dict[str, float], ...]
    time_to_first_step_s: float
    job: JobOutcome
    extra: dict[str, Any] = field(default_factory=dict)
    attempts: tuple[dict[str, Any], ...] = ()
    """One entry per worker-group start (a restart after a lost worker adds one)."""


@dataclass(frozen=True)
class TrainOutcome:
    """What a launcher hands the train stage, whichever the target."""

    bundle_key: str
    """Store key (prefix) of the model bundle: ``models/RUN_ID/bundle``."""
    checkpoint_uri: str
    """The final checkpoint (the one the bundle was made from)."""
    epochs: int
    history: tuple[dict, ...]
    """Per-epoch metrics of the whole run (across restarts)."""
    time_to_first_step_s: float | None
    job: dict | None = None
    """For cluster targets the job as :meth:`JobOutcome.record` gives it; None for a local run."""
    attempts: tuple[dict, ...] = ()
    """One entry per worker-group start: the epoch it resumed from, the world size; more
    than one after a worker was lost and the group restarted from a checkpoint."""

    @classmethod
    def of(cls, result: TrainResult | ClusterTrainResult, *, job: dict | None = None) -> TrainOutcome:
        """The outcome of a local (:class:`~kubeml.training.fit.TrainResult`) or cluster run."""
        return cls(bundle_key=result.bundle_key, checkpoint_uri=result.checkpoint_uri, epochs=result.epochs,
                   history=result.history, time_to_first_step_s=result.time_to_first_step_s, job=job,
                   attempts=tuple(getattr(result, "attempts", ()) or ()))


# ------------------------------------------------------------------ the result record


def result_key(run_id: str) -> str:
    """Store key of a run's result record, written by the job, read by the step."""
    return f"runs/{run_id}/train/result.json"


def write_result(store: ArtifactStore, result: TrainResult) -> str:
    """Write the result record of a finished :func:`~kubeml.training.fit.fit`; returns its key."""
    key = result_key(result.run_id)
    store.put_text(key, json.dumps({
        "run_id": result.run_id,
        "bundle_key": result.bundle_key,
        "checkpoint_uri": result.checkpoint_uri,
        "best_checkpoint_uri": result.best_checkpoint_uri,
        "epochs": result.epochs,
        "history": list(result.history),
        "time_to_first_step_s": result.time_to_first_step_s,
        "wall_s": result.wall_s,
        "stopped_early": result.stopped_early,
        "attempts": list(result.attempts),
    }, indent=2))
    return key


def read_result(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """The result record of ``run_id``; ``JobError`` naming the key when the job wrote none."""
    from kubeml.errors import ArtifactNotFound

    try:
        return json.loads(store.get_text(result_key(run_id)))
    except ArtifactNotFound:
        raise JobError(
            f"the training job of run {run_id} reported success but wrote no result record at "
            f"{store.url(result_key(run_id))}; its image must run kubeml.training.ray_main of this kubeml version"
        ) from None
