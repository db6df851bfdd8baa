"""Prometheus metrics of the operator, on their own registry (no process-global state).

Names are what the chart's PrometheusRule and Grafana dashboard query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily

if TYPE_CHECKING:
    from kubeml.operators._kube import KubeApi
    from kubeml.operators._reconcile import Outcome

__all__ = ["Metrics"]


class _ApiCollector:
    def __init__(self, api: KubeApi):
        self._api = api

    def collect(self):  # type: ignore[no-untyped-def]
        family = CounterMetricFamily("kubeml_operator_api_requests", "API requests by HTTP verb",
                                     labels=["verb"])
        for verb, n in sorted(self._api.counts().by_verb.items()):
            family.add_metric([verb], n)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter("kubeml_operator_reconciles", "Tenant reconciles by result",
                                  ["result"], registry=self.registry)
        self.writes = Counter("kubeml_operator_child_writes", "Child objects created or repaired",
                              ["action"], registry=self.registry)
        self.ready = Gauge("kubeml_operator_tenant_ready", "1 when the Tenant is Ready",
                               ["tenant"], registry=self.registry)

    def observe(self, tenant: str, outcome: Outcome) -> None:
        self.reconciles.labels("ready" if outcome.ready else "rejected").inc()
        self.writes.labels("created").inc(outcome.created)
        self.writes.labels("repaired").inc(outcome.patched)
        self.ready.labels(tenant).set(1 if outcome.ready else 0)

    def serve(self, port: int, api: KubeApi) -> None:
        self.registry.register(_ApiCollector(api))
        start_http_server(port, registry=self.registry)
