"""Kubernetes client loading, and the pod security every platform pod carries: one copy each.

Every part of kubeml that talks to a Kubernetes API gets its ``ApiClient`` here, so the
credential order is the same everywhere: an explicit kubeconfig, else in-cluster
service-account credentials (a pipeline step, the operator pod), else ``$KUBECONFIG`` (or
``~/.kube/config``). The client library's global default configuration is never touched, so
two clients for two clusters can live in one process (the test harness relies on it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubeml.errors import ConfigError

__all__ = ["PLATFORM_POD_UID", "PLATFORM_UID", "api_client", "custom_objects_api", "read_only_root_scratch",
           "restricted_container_security", "restricted_pod_security"]

#: User and group id platform containers run as: any non-root id satisfies Pod Security
#: ``restricted``; a numeric one lets the kubelet check ``runAsNonRoot`` even for an image
#: whose USER is a name.
PLATFORM_UID = 1000
#: User and group id the pods kubeml generates run as (predictors, Ray head and workers), as
#: the chart's operator pod does: above 10000, so no user of the node shares it (the policy
#: scan's container-security-context-user-group-id). The images run under any uid (HOME=/tmp).
PLATFORM_POD_UID = 65532


def restricted_pod_security() -> dict[str, Any]:
    """Pod ``securityContext`` of every pod kubeml builds (predictors, Ray head and workers),
    so that tenant namespaces, which enforce Pod Security ``restricted``, admit them."""
    return {"runAsNonRoot": True, "runAsUser": PLATFORM_POD_UID, "runAsGroup": PLATFORM_POD_UID,
            "fsGroup": PLATFORM_POD_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def restricted_container_security() -> dict[str, Any]:
    """Container ``securityContext`` to go with :func:`restricted_pod_security`."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def read_only_root_scratch() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(volume, volumeMount)`` of the writable scratch that a container with a read-only root
    filesystem needs: an emptyDir on /tmp (HOME is /tmp in the kubeml images, and Ray keeps its
    session directory there). Fresh dicts on every call, so callers may change them."""
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}

#: HTTP connections per client. The library's default (cpu_count * 5) starves kopf's worker
#: threads on a 2-core machine; 32 serves the operator's and a watcher's concurrency.
CONNECTION_POOL_MAXSIZE = 32


def api_client(kubeconfig: str | Path | None = None, *, in_cluster_first: bool = True) -> Any:
    """An ``ApiClient`` from ``kubeconfig``, else in-cluster credentials, else ``$KUBECONFIG``.

    Raises :class:`~kubeml.errors.ConfigError` naming both places looked at when neither
    gives credentials.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is not None:
        try:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(f"kubeconfig {kubeconfig} is not usable: {exc}") from None
    else:
        try:
            if not in_cluster_first:
                raise config.ConfigException("in-cluster credentials not asked for")
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            try:
                # Read KUBECONFIG now: the library's default is taken when it is first imported.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                        client_configuration=configuration)
            except (config.ConfigException, OSError) as exc:
                raise ConfigError(
                    f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({exc}); "
                    "set KUBECONFIG or run inside the cluster"
                ) from None
    configuration.connection_pool_maxsize = CONNECTION_POOL_MAXSIZE
    return client.ApiClient(configuration)


def custom_objects_api(client_: Any | None = None) -> Any:
    """``CustomObjectsApi`` on ``client_``, else on :func:`api_client`'s default credentials."""
    from kubernetes import client

    return client.CustomObjectsApi(client_ if client_ is not None else api_client())
