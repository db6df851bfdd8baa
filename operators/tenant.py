"""The Tenant operator's kopf wiring: handlers, settings, login and the run entry point.

Handlers are registered on a fresh :class:`kopf.OperatorRegistry` per :class:`TenantOperator`,
so several operators (or a test's operator next to a benchmark's) never share global state.
Every trigger, create, update, resume and the periodic resync timer, runs the same
level-triggered :func:`~kubeml.operators._reconcile.reconcile`; a per-Tenant lock keeps a
resync from racing a change event on the same object.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf

from kubeml._kube import api_client
from kubeml.operators._desired import FINALIZER, GROUP, OperatorConfig
from kubeml.operators._kube import KubeApi
from kubeml.operators._reconcile import NamespaceBusy, Outcome, cleanup, reconcile

__all__ = ["TenantOperator", "load_api_client"]

log = logging.getLogger("kubeml.operators.tenant")

# Seconds before a failed reconcile is retried: quick enough that a transient API error
# (a restarting apiserver, a 409) heals within a test's patience, slow enough not to spin.
_RETRY_DELAY_S = 2.0
# Seconds between checks while the namespace of a deleted Tenant terminates (the namespace
# controller empties it first; typically 1-5 s).
_CLEANUP_POLL_S = 1.0


def load_api_client(kubeconfig: str | Path | None = None) -> Any:
    """An ``ApiClient`` from ``kubeconfig``, else in-cluster credentials, else ``$KUBECONFIG``."""
    return api_client(kubeconfig)


def _connection_info(api_client: Any) -> kopf.ConnectionInfo:
    c = api_client.configuration
    # In a pod the client holds the ServiceAccount token, which the kubelet rotates; its
    # refresh hook re-reads the projected file (kopf logs in again after a 401).
    if getattr(c, "refresh_api_key_hook", None) is not None:
        c.refresh_api_key_hook(c)
    token = None
    if c.api_key.get("authorization"):
        # In-cluster config writes "bearer <token>", a kubeconfig "Bearer <token>".
        scheme, _, value = c.api_key["authorization"].strip().partition(" ")
        token = (value if scheme.lower() == "bearer" else scheme).strip()
    return kopf.ConnectionInfo(
        server=c.host,
        ca_path=c.ssl_ca_cert,
        insecure=not c.verify_ssl,
        certificate_path=c.cert_file,
        private_key_path=c.key_file,
        scheme="Bearer" if token else None,
        token=token,
    )


@dataclass
class TenantOperator:
    """One Tenant operator: its config, its API access and its kopf registry.

    >>> op = TenantOperator(OperatorConfig(resync_s=5), api_client)   # doctest: +SKIP
    >>> asyncio.run(op.run(stop_flag=stop))                          # doctest: +SKIP
    """

    config: OperatorConfig
    api_client: Any
    registry: kopf.OperatorRegistry = field(default_factory=kopf.OperatorRegistry)
    on_outcome: Callable[[str, Outcome], None] | None = None
    """Called after each reconcile (metrics, benchmarks)."""

    def __post_init__(self) -> None:
        self.api = KubeApi(self.api_client)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._register()

    # --- the handlers -------------------------------------------------------------------------
    def _lock(self, uid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(uid, threading.Lock())

    def reconcile_now(self, body: Any) -> Outcome:
        """Reconcile one Tenant body synchronously (what every trigger does)."""
        tenant = dict(body)
        with self._lock(tenant["metadata"].get("uid", "")):
            try:
                outcome = reconcile(self.api, tenant, self.config)
            except NamespaceBusy as exc:
                raise kopf.TemporaryError(str(exc), delay=_CLEANUP_POLL_S) from exc
        if not outcome.ready:
            log.warning("tenant %s rejected: %s: %s", tenant["metadata"]["name"], outcome.reason, outcome.message)
        elif outcome.created or outcome.patched:
            log.info("tenant %s: %d created, %d repaired", tenant["metadata"]["name"],
                     outcome.created, outcome.patched)
        if self.on_outcome:
            self.on_outcome(tenant["metadata"]["name"], outcome)
        return outcome

    def _register(self) -> None:
        registry = self.registry
        resource = (GROUP, "v1alpha1", "tenants")

        @kopf.on.startup(registry=registry)
        def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.persistence.finalizer = FINALIZER
            # Only warnings become Kubernetes Events: an INFO event per resync would be a
            # write per Tenant per resync, defeating "a no-op reconcile writes nothing".
            settings.posting.level = logging.WARNING
            # One replica (Recreate strategy) instead of kopf peering: no peering CRD, no
            # cluster-wide lease writes every few seconds.
            settings.peering.standalone = True
            # The Tenant CRD is installed before the operator; no need to watch all CRDs
            # (that would need list/watch on customresourcedefinitions).
            settings.scanning.disabled = True
            settings.watching.server_timeout = 300
            settings.batching.error_delays = [1, 2, 5, 10, 30]

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return _connection_info(self.api_client)

        @kopf.on.probe(id="reconciled", registry=registry)
        def probe(**_: Any) -> dict[str, int]:
            counts = self.api.counts()
            return {"apiReads": counts.reads, "apiWrites": counts.writes}

        def handle(body: Any, **_: Any) -> None:
            self.reconcile_now(body)

        kopf.on.resume(*resource, registry=registry, backoff=_RETRY_DELAY_S)(handle)
        kopf.on.create(*resource, registry=registry, backoff=_RETRY_DELAY_S)(handle)
        kopf.on.update(*resource, field="spec", registry=registry, backoff=_RETRY_DELAY_S)(handle)

        @kopf.timer(*resource, interval=self.config.resync_s, initial_delay=self.config.resync_s,
                    registry=registry)
        def resync(body: Any, **_: Any) -> None:
            if body.get("metadata", {}).get("deletionTimestamp"):
                return
            self.reconcile_now(body)

        @kopf.on.delete(*resource, registry=registry, backoff=_CLEANUP_POLL_S)
        def delete(body: Any, **_: Any) -> None:
            tenant = dict(body)
            with self._lock(tenant["metadata"].get("uid", "")):
                gone = cleanup(self.api, tenant, self.config)
            if not gone:
                raise kopf.TemporaryError(
                    f"waiting for the children of tenant {tenant['metadata']['name']} to be deleted",
                    delay=_CLEANUP_POLL_S)

    # --- running ------------------------------------------------------------------------------
    async def run(self, *, stop_flag: Any = None, ready_flag: Any = None,
                  liveness_endpoint: str | None = None) -> None:
        await kopf.operator(
            registry=self.registry,
            clusterwide=True,
            standalone=True,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            liveness_endpoint=liveness_endpoint,
        )

    def run_forever(self, *, liveness_endpoint: str | None = None) -> None:
        asyncio.run(self.run(liveness_endpoint=liveness_endpoint))
