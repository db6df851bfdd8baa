"""Rollouts: canary, shadow and blue/green deployment with automated analysis.

One engine (:class:`RolloutEngine`) steps traffic, analyses each window and promotes or
rolls back; a backend carries it out: :class:`LocalBackend` (a kubeml router in front of
local model servers) or :class:`InferenceServiceBackend` (a KServe InferenceService on a
cluster, measured through Prometheus).

Deploy a new version locally as a canary::

    from kubeml.serving.rollout import RolloutPolicy, deploy_local

    outcome = deploy_local("digits", "4", bundle_dir, policy=RolloutPolicy(steps=(10, 50, 100)),
                           replay_rows=x_test)
    print(outcome.action, outcome.stable_version)

Importing this package imports neither kserve nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubeml.serving.rollout.engine import (
    Analysis,
    BackendMetrics,
    Decision,
    DecisionLog,
    RolloutBackend,
    RolloutEngine,
    RolloutPolicy,
    RolloutResult,
    WindowMetrics,
    analyse,
)
from kubeml.serving.rollout.local import DeployOutcome, LocalBackend, deploy_local
from kubeml.serving.rollout.replay import ReplayStats, TrafficReplayer
from kubeml.serving.rollout.router import Routes

if TYPE_CHECKING:
    from kubeml.serving.rollout.cluster import InferenceServiceBackend, PrometheusMetrics

__all__ = [
    "Analysis",
    "BackendMetrics",
    "Decision",
    "DecisionLog",
    "DeployOutcome",
    "InferenceServiceBackend",
    "LocalBackend",
    "PrometheusMetrics",
    "ReplayStats",
    "RolloutBackend",
    "RolloutEngine",
    "RolloutPolicy",
    "RolloutResult",
    "Routes",
    "TrafficReplayer",
    "WindowMetrics",
    "analyse",
    "deploy_local",
]

_LAZY = {"InferenceServiceBackend", "PrometheusMetrics"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # pulls in the kubernetes client only when asked for
        from kubeml.serving.rollout import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
