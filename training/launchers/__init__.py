"""Launchers: where a training run happens, chosen by ``training.target``.

Where it sits: the seam between the train stage (:func:`kubeml.stages.train_stage`,
``kubeml train``) and the places a run can go. :func:`get_launcher` maps a target to its
:class:`Launcher`; every launcher's :meth:`Launcher.train` returns a :class:`TrainOutcome`:

- ``local`` (:mod:`.local`): Ray Train in this process's Ray runtime;
- ``kuberay`` (:mod:`.kuberay`): a KubeRay ``RayJob`` on the cluster;
- ``sagemaker`` (:mod:`.sagemaker`): an ACK SageMaker ``TrainingJob`` on the cluster.

The cluster launchers share the job life cycle (:mod:`._jobs`: submit or adopt, wait,
cancel on SIGTERM), the artifact contract (:mod:`._contract`: what the job leaves in the
store) and the path that joins them (:mod:`._cluster`: :func:`train_on_cluster`). Their
modules are imported when a launcher is asked for, so this package stays cheap to import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kubeml.errors import ConfigError
from kubeml.training.launchers._cluster import CLUSTER_TARGETS, ClusterLauncher, build_manifest, train_on_cluster
from kubeml.training.launchers._contract import (
    ClusterTrainResult,
    JobOutcome,
    TrainOutcome,
    read_result,
    result_key,
    write_result,
)
from kubeml.training.launchers._jobs import (
    RBAC_RULES,
    JobApiError,
    JobState,
    cancel_on_sigterm,
    job_state,
    run_job,
    server_dry_run,
    spec_hash,
)

if TYPE_CHECKING:
    from kubeml.artifacts import ArtifactStore
    from kubeml.config import EnvironmentConfig

__all__ = [
    "CLUSTER_TARGETS",
    "ClusterLauncher",
    "ClusterTrainResult",
    "JobApiError",
    "JobOutcome",
    "JobState",
    "LAUNCHERS",
    "Launcher",
    "RBAC_RULES",
    "TrainOutcome",
    "build_manifest",
    "cancel_on_sigterm",
    "get_launcher",
    "job_state",
    "read_result",
    "result_key",
    "run_job",
    "server_dry_run",
    "spec_hash",
    "train_on_cluster",
    "write_result",
]


class Launcher(Protocol):
    """Trains one run somewhere and reports what it left in the artifact store."""

    name: str
    """The ``training.target`` value this launcher serves."""

    def train(
        self,
        cfg: EnvironmentConfig,
        store: ArtifactStore,
        *,
        run_id: str,
        dataset: str,
        dataset_version: str,
        on_status: Callable[[str], None] | None = None,
    ) -> TrainOutcome:
        """Train ``run_id`` on ``dataset`` ``dataset_version``; ``on_status`` gets each new job status line."""
        ...


#: ``training.target`` -> (module, class) of its launcher, imported on first use: the
#: cluster modules pull in pydantic models and the local one Ray and torch when it trains.
LAUNCHERS: dict[str, tuple[str, str]] = {
    "local": ("kubeml.training.launchers.local", "LocalLauncher"),
    "kuberay": ("kubeml.training.launchers.kuberay", "KubeRayLauncher"),
    "sagemaker": ("kubeml.training.launchers.sagemaker", "SageMakerLauncher"),
}


def get_launcher(target: str) -> Launcher:
    """The launcher of ``training.target`` ``target``; :class:`ConfigError` for an unknown one."""
    try:
        module, cls = LAUNCHERS[target]
    except (KeyError, TypeError):
        raise ConfigError(
            f"training.target {target!r} is not a known target; allowed values: {', '.join(sorted(LAUNCHERS))}"
        ) from None
    return getattr(importlib.import_module(module), cls)()
