"""Cluster rollout backend: patch a KServe InferenceService, measure through Prometheus.

Where it sits: the same :class:`~kubeml.serving.rollout.engine.RolloutEngine` that drives
the local router drives this backend on EKS. Traffic is split by KServe itself
(``canaryTrafficPercent`` in Knative mode, ``spec.canary[].trafficPercent`` in standard
mode); the analysis reads the kubeml server's own metrics from Prometheus, labelled by
version, so the thresholds mean the same thing on both targets. This is the only module
of the rollout package that talks to the Kubernetes API.

Divergence on the cluster: requests are not paired (KServe sends each to one side), so
the divergence reported is the total variation distance between the predicted-class
distributions of stable and canary over the window (``kubeml_predictions_total``),
expressed as ``differing / compared`` over the canary's instances.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from kubeml.errors import ConfigError, ServingError
from kubeml.serving.inferenceservice import Mode, PredictorConfig, predictor_spec
from kubeml.serving.rollout.engine import BackendMetrics, WindowMetrics

__all__ = ["InferenceServiceBackend", "PrometheusMetrics"]

_GROUP, _VERSION, _PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


class PrometheusMetrics:
    """Reads per-version request, error, latency and prediction metrics from Prometheus."""

    def __init__(self, url: str, *, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, promql: str) -> list[dict[str, Any]]:
        try:
            r = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout_s)
            r.raise_for_status()
            body = r.json()
        except (requests.RequestException, ValueError) as exc:
            raise ServingError(f"Prometheus query failed at {self.url}: {exc}") from exc
        if body.get("status") != "success":
            raise ServingError(f"Prometheus rejected {promql!r}: {body.get('error')}")
        return body["data"]["result"]

    def scalar(self, promql: str) -> float:
        result = self.query(promql)
        if not result:
            return 0.0
        value = float(result[0]["value"][1])
        return 0.0 if value != value else value  # NaN (no samples) counts as 0

    def window(self, model: str, stable: str, canary: str, window_s: float) -> WindowMetrics:
        w = f"{max(1, int(round(window_s)))}s"

        def side(version: str) -> BackendMetrics:
            sel = f'model="{model}",version="{version}"'
            total = self.scalar(f"sum(increase(kubeml_requests_total{{{sel}}}[{w}]))")
            errors = self.scalar(f'sum(increase(kubeml_requests_total{{{sel},status=~"5.."}}[{w}]))')
            quantile = "histogram_quantile({q}, sum by (le) (rate(kubeml_request_latency_seconds_bucket{{{sel}}}[{w}])))"
            p50 = self.scalar(quantile.format(q=0.5, sel=sel, w=w)) * 1000
            p99 = self.scalar(quantile.format(q=0.99, sel=sel, w=w)) * 1000
            return BackendMetrics(int(round(total)), int(round(errors)), p50, p99)

        def classes(version: str) -> dict[str, float]:
            rows = self.query(
                f'sum by (class) (increase(kubeml_predictions_total{{model="{model}",version="{version}"}}[{w}]))'
            )
            return {r["metric"].get("class", ""): float(r["value"][1]) for r in rows}

        s, c = classes(stable), classes(canary)
        s_total, c_total = sum(s.values()), sum(c.values())
        compared = differing = 0
        if s_total and c_total:
            tvd = 0.5 * sum(abs(s.get(k, 0) / s_total - c.get(k, 0) / c_total) for k in set(s) | set(c))
            compared = int(round(c_total))
            differing = int(round(tvd * compared))
        return WindowMetrics(side(stable), side(canary), compared, differing, window_s)


class InferenceServiceBackend:
    """Implements :class:`~kubeml.serving.rollout.engine.RolloutBackend` for one ISVC.

    ``api_client`` is a ``kubernetes.client.ApiClient``; the InferenceService ``name``
    must already serve ``stable`` (see :func:`~kubeml.serving.inferenceservice.inference_service`).
    Shadow (mirror) traffic is a feature of the local router; KServe has no mirror split.
    """

    #: Seconds between readiness polls of the InferenceService status.
    POLL_S = 2.0

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        *,
        stable: PredictorConfig,
        canary: PredictorConfig,
        mode: Mode,
        prometheus: PrometheusMetrics | None,
        wait_ready: bool = True,
        ready_timeout_s: float = 600.0,
    ):
        from kubernetes.client import CustomObjectsApi

        self.api = CustomObjectsApi(api_client)
        self.namespace = namespace
        self.name = name
        self.model = stable.model_name
        self.stable, self.canary = stable, canary
        self.stable_version, self.canary_version = stable.version, canary.version
        self.mode = mode
        self.prometheus = prometheus
        self.wait_ready = wait_ready
        self.ready_timeout_s = ready_timeout_s

    # -- API -------------------------------------------------------------------------------

    def get(self) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(_GROUP, _VERSION, self.namespace, _PLURAL, self.name)

    def _patch(self, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            # A dict body goes out as a JSON merge patch: None deletes a field
            # (canaryTrafficPercent, spec.canary).
            return self.api.patch_namespaced_custom_object(
                _GROUP, _VERSION, self.namespace, _PLURAL, self.name, body
            )
        except ApiException as exc:
            raise ServingError(
                f"patching InferenceService {self.namespace}/{self.name} failed "
                f"({exc.status}): {exc.body}"
            ) from exc

    def _canary_ready(self) -> bool:
        status = self.get().get("status") or {}
        component = (status.get("components") or {}).get("predictor") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or ()}
        if self.mode == "knative":
            return bool(component.get("latestReadyRevision")) and (
                component.get("latestReadyRevision") == component.get("latestCreatedRevision")
            )
        return conditions.get("Ready") == "True"

    # -- RolloutBackend --------------------------------------------------------------------

    def start_canary(self) -> None:
        if self.mode == "knative":
            # New revision with no traffic yet: KServe keeps 100% on the rolled-out one.
            self._patch({"spec": {"predictor": {**predictor_spec(self.canary), "canaryTrafficPercent": 0}}})
        else:
            self._patch({"spec": {"canary": [{"predictor": predictor_spec(self.canary), "trafficPercent": 0}]}})
        if not self.wait_ready:
            return
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._canary_ready():
            if time.monotonic() > deadline:
                self.rollback()
                raise ServingError(
                    f"canary {self.canary_version} of {self.namespace}/{self.name} was not ready "
                    f"after {self.ready_timeout_s:.0f} s"
                )
            time.sleep(self.POLL_S)

    def set_traffic(self, *, weight: int, mirror: bool) -> None:
        if mirror:
            raise ConfigError(
                "KServe cannot mirror traffic; run shadow analyses locally or set shadow_analyses=0"
            )
        if self.mode == "knative":
            self._patch({"spec": {"predictor": {"canaryTrafficPercent": weight}}})
        else:
            self._patch({"spec": {"canary": [{"predictor": predictor_spec(self.canary), "trafficPercent": weight}]}})

    def metrics(self, since: float) -> WindowMetrics:
        if self.prometheus is None:
            raise ServingError("no Prometheus configured: the cluster backend cannot measure traffic")
        return self.prometheus.window(self.model, self.stable_version, self.canary_version, time.time() - since)

    def promote(self) -> None:
        if self.mode == "knative":
            self._patch({"spec": {"predictor": {"canaryTrafficPercent": None}}})
        else:
            self._patch({"spec": {"predictor": predictor_spec(self.canary), "canary": None}})
        self.stable, self.stable_version = self.canary, self.canary_version

    def rollback(self) -> None:
        if self.mode == "knative":
            # Back to the stable spec: KServe routes everything to the rolled-out revision.
            stable = predictor_spec(self.stable)
            self._patch({"spec": {"predictor": {**stable, "canaryTrafficPercent": None}}})
        else:
            self._patch({"spec": {"canary": None}})
