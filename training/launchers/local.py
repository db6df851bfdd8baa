"""The local launcher: Ray Train on whatever Ray runtime this process finds or starts.

Where it sits: the :class:`~kubeml.training.launchers.Launcher` of ``training.target:
local``. It calls :func:`kubeml.training.fit.fit` in this process (which starts a local Ray
runtime on demand, or joins ``RAY_ADDRESS``) and hands its result back as a
:class:`~kubeml.training.launchers.TrainOutcome`; no Kubernetes object is involved, so
``job`` is None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kubeml.training.launchers._contract import TrainOutcome

if TYPE_CHECKING:
    from kubeml.artifacts import ArtifactStore
    from kubeml.config import EnvironmentConfig

__all__ = ["LocalLauncher"]


class LocalLauncher:
    """``training.target: local``: :func:`~kubeml.training.fit.fit` here, no job."""

    name = "local"

    def train(self, cfg: EnvironmentConfig, store: ArtifactStore, *, run_id: str, dataset: str,
              dataset_version: str, on_status: Callable[[str], None] | None = None) -> TrainOutcome:
        """:meth:`kubeml.training.launchers.Launcher.train` in this process."""
        # on_status is for job status lines; a local run has none (its progress goes to
        # runs/RUN_ID/train/progress.json like every run's).
        from kubeml.training.fit import fit

        return TrainOutcome.of(fit(cfg, store, dataset=dataset, dataset_version=dataset_version, run_id=run_id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
