"""Deploy targets: where an approved model version is served.

Where it sits: the seam between the pipeline's deploy stage and the serving back ends.
``serving.target`` in ``kubeml.yaml`` names a target; :func:`get_deploy_target` returns it
and :meth:`DeployTarget.deploy` serves one bundle, returning a
:class:`~kubeml.serving.rollout.local.DeployOutcome`. Two targets exist:

* ``local`` (:class:`LocalDeployTarget`): model servers and the rollout router on this
  machine, through :func:`~kubeml.serving.rollout.local.deploy_local`; a later version
  goes out as a canary against the one being served;
* ``kserve`` (:class:`KServeDeployTarget`): a KServe ``InferenceService`` on the cluster.
  Not available yet: it refuses with a :class:`~kubeml.errors.ConfigError`. The manifest
  builders it will use are in :mod:`kubeml.serving.inferenceservice`.

Importing this module is cheap: the rollout machinery loads when a target deploys.

>>> get_deploy_target("local").name
'local'
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kubeml.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from kubeml.config import ServingConfig
    from kubeml.serving.rollout.local import DeployOutcome

__all__ = [
    "DeployTarget",
    "KServeDeployTarget",
    "LocalDeployTarget",
    "get_deploy_target",
]


class DeployTarget(Protocol):
    """Serves one version of a model somewhere; ``name`` is its ``serving.target`` value."""

    name: str

    def deploy(
        self,
        *,
        model: str,
        version: str,
        bundle_dir: Path,
        serving: ServingConfig,
        state_dir: Path,
        replay_rows: np.ndarray | None = None,
    ) -> DeployOutcome:
        """Serve ``bundle_dir`` as ``version`` of ``model``; what happened, and where.

        ``serving`` is the config's ``serving`` section (host, ports, server options);
        ``state_dir`` holds the target's local state; ``replay_rows`` (held-out features)
        may be replayed as traffic while a new version is analysed.
        """
        ...


class LocalDeployTarget:
    """Model servers and the rollout router on this machine (``serving.target: local``).

    The router listens on ``serving.http_port`` (REST) and ``serving.grpc_port`` (OIP
    gRPC) whichever version answers; version servers get the section's batching and
    timeout keys (:meth:`~kubeml.config.ServingConfig.server_options`).
    """

    name = "local"

    def deploy(
        self,
        *,
        model: str,
        version: str,
        bundle_dir: Path,
        serving: ServingConfig,
        state_dir: Path,
        replay_rows: np.ndarray | None = None,
    ) -> DeployOutcome:
        from kubeml.serving.rollout.local import deploy_local

        return deploy_local(
            model,
            version,
            bundle_dir,
            state_dir=state_dir,
            host=serving.host,
            router_port=serving.http_port,
            router_grpc_port=serving.grpc_port,
            replay_rows=replay_rows,
            **serving.server_options(),
        )


class KServeDeployTarget:
    """A KServe ``InferenceService`` on the cluster (``serving.target: kserve``).

    Not available yet: :meth:`deploy` refuses, naming the setting that works today.
    """

    name = "kserve"

    # The other keywords of DeployTarget.deploy are accepted and unused: nothing is served.
    def deploy(self, *, model: str, version: str, **_options: Any) -> DeployOutcome:
        raise ConfigError(
            f"serving.target 'kserve': serving {model!r} version {version} on a cluster "
            "through a KServe InferenceService is not available yet; set "
            "`serving.target: local` to serve it on this machine (the InferenceService "
            "manifest builders are in kubeml.serving.inferenceservice)"
        )


#: ``serving.target`` value -> the class that serves it.
_TARGETS: dict[str, type[LocalDeployTarget] | type[KServeDeployTarget]] = {
    LocalDeployTarget.name: LocalDeployTarget,
    KServeDeployTarget.name: KServeDeployTarget,
}


def get_deploy_target(name: str) -> DeployTarget:
    """The deploy target ``serving.target`` names; ConfigError for any other name.

    >>> get_deploy_target("ec2")
    Traceback (most recent call last):
    ...
    kubeml.errors.ConfigError: serving.target 'ec2' is not a deploy target; use one of: 'kserve', 'local'
    """
    try:
        target = _TARGETS[name]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(n) for n in sorted(_TARGETS))
        raise ConfigError(
            f"serving.target {name!r} is not a deploy target; use one of: {allowed}"
        ) from None
    return target()
