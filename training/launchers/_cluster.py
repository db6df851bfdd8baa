"""The train stage's cluster path: manifest, job and result record put together.

Where it sits: between the manifest builders (:mod:`~kubeml.training.launchers.kuberay`,
:mod:`~kubeml.training.launchers.sagemaker`), the job life cycle
(:mod:`~kubeml.training.launchers._jobs`) and the artifact contract
(:mod:`~kubeml.training.launchers._contract`). :class:`ClusterLauncher` is the
:class:`~kubeml.training.launchers.Launcher` of every cluster target; ``kubeml train
--target kuberay|sagemaker`` calls :func:`train_on_cluster` itself (it has its own cancel).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kubeml.errors import ConfigError, JobError
from kubeml.training.launchers._contract import ClusterTrainResult, TrainOutcome, read_result
from kubeml.training.launchers._jobs import cancel_on_sigterm, run_job

if TYPE_CHECKING:
    from kubeml.artifacts import ArtifactStore
    from kubeml.config import EnvironmentConfig, TrainingConfig

__all__ = ["CLUSTER_TARGETS", "ClusterLauncher", "build_manifest", "train_on_cluster"]

CLUSTER_TARGETS = ("kuberay", "sagemaker")


class ClusterLauncher:
    """A launcher that trains as a Kubernetes job; a subclass names its target, the
    ``training.launcher`` options model of it and the function that builds its manifest.

    :meth:`train` follows the job inside :func:`cancel_on_sigterm`: KFP terminates a
    cancelled run's step with SIGTERM, and the job it started is then deleted.
    """

    name: str = ""
    options_type: Any = None
    """The options model; ``options_type.from_training(cfg.training)`` validates ``training.launcher``."""
    build: Callable[..., dict[str, Any]]
    """``build(cfg, *, run_id, dataset, dataset_version, options, resume)``: the job's manifest."""

    def options(self, tc: TrainingConfig) -> Any:
        """The validated ``training.launcher`` options of this target."""
        return self.options_type.from_training(tc)

    def manifest(self, cfg: EnvironmentConfig, *, run_id: str, dataset: str, dataset_version: str,
                 options: Any, resume: bool = False) -> dict[str, Any]:
        """The job's manifest, built with ``options``."""
        return self.build(cfg, run_id=run_id, dataset=dataset, dataset_version=dataset_version,
                          options=options, resume=resume)

    def train(self, cfg: EnvironmentConfig, store: ArtifactStore, *, run_id: str, dataset: str,
              dataset_version: str, on_status: Callable[[str], None] | None = None) -> TrainOutcome:
        """:meth:`kubeml.training.launchers.Launcher.train` as a job on the cluster."""
        with cancel_on_sigterm() as stop:
            res = train_on_cluster(cfg, store, target=self.name, run_id=run_id, dataset=dataset,
                                   dataset_version=dataset_version, on_status=on_status, stop=stop)
        return TrainOutcome.of(res, job=res.job.record())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _cluster_launcher(target: str) -> ClusterLauncher:
    if target not in CLUSTER_TARGETS:
        raise ConfigError(f"training target {target!r} does not run on a cluster; "
                          f"cluster targets: {', '.join(CLUSTER_TARGETS)}")
    from kubeml.training.launchers import get_launcher

    launcher = get_launcher(target)
    assert isinstance(launcher, ClusterLauncher)
    return launcher


def build_manifest(cfg: EnvironmentConfig, target: str, *, run_id: str, dataset: str, dataset_version: str,
                   resume: bool = False) -> tuple[dict[str, Any], Any]:
    """The job manifest for ``target`` and the launcher options it was built with."""
    launcher = _cluster_launcher(target)
    opts = launcher.options(cfg.training)
    return launcher.manifest(cfg, run_id=run_id, dataset=dataset, dataset_version=dataset_version,
                             options=opts, resume=resume), opts


def train_on_cluster(
    cfg: EnvironmentConfig,
    store: ArtifactStore,
    *,
    target: str,
    run_id: str,
    dataset: str,
    dataset_version: str,
    resume: bool = False,
    timeout_s: float | None = None,
    poll_s: float | None = None,
    on_status: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    api_client: Any | None = None,
) -> ClusterTrainResult:
    """Train ``run_id`` as a RayJob (``kuberay``) or ACK TrainingJob (``sagemaker``), wait, and
    return what the job left in the artifact store (see :mod:`~kubeml.training.launchers._contract`).

    ``timeout_s`` / ``poll_s`` default to the launcher options ``wait_timeout_s`` / ``poll_s``.
    After success the bundle must be there: a job that reports success without writing it is
    an error naming the missing key.
    """
    if not store.uri.startswith("s3://"):
        raise ConfigError(
            f"training.target {target} needs an artifact store the job's pods and this step share: "
            f"set artifact_store.uri to s3://... (it is {store.uri})"
        )
    manifest, opts = build_manifest(cfg, target, run_id=run_id, dataset=dataset, dataset_version=dataset_version,
                                    resume=resume)
    stall = {"stall_s": opts.stall_timeout_s, "image_grace_s": opts.image_grace_s} if hasattr(
        opts, "stall_timeout_s") else {}
    outcome = run_job(manifest, namespace=opts.namespace, timeout_s=timeout_s or opts.effective_wait_timeout_s,
                      poll_s=poll_s or opts.poll_s, on_status=on_status, stop=stop, api_client=api_client, **stall)
    record = read_result(store, run_id)
    bundle_key = record["bundle_key"]
    if not store.list(bundle_key):
        raise JobError(f"{outcome.kind} {outcome.namespace}/{outcome.name} succeeded but the model bundle "
                       f"{store.url(bundle_key)} is missing")
    known = {"run_id", "bundle_key", "checkpoint_uri", "best_checkpoint_uri", "epochs", "history", "time_to_first_step_s",
             "attempts"}
    return ClusterTrainResult(
        run_id=run_id,
        bundle_key=bundle_key,
        bundle_uri=store.url(bundle_key),
        checkpoint_uri=record.get("checkpoint_uri", ""),
        best_checkpoint_uri=record.get("best_checkpoint_uri", ""),
        epochs=int(record.get("epochs", 0)),
        history=tuple(record.get("history") or ()),
        time_to_first_step_s=float(record.get("time_to_first_step_s") or float("nan")),
        job=outcome,
        extra={k: v for k, v in record.items() if k not in known},
        attempts=tuple(record.get("attempts") or ()),
    )
