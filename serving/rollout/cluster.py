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

Windows and scrapes: Prometheus only knows the counters at scrape times, and
``increase()`` needs at least two samples of a series inside the range (with one it
returns nothing, which would read as "no traffic"). Each window is therefore at least
:attr:`PrometheusMetrics.MIN_SCRAPES_PER_WINDOW` (4) scrape intervals long: 4 s with the
1 s scrapes of the integration tests, 2 min with the platform chart's 30 s ServiceMonitor,
so an engine ``interval_s`` shorter than that is measured over the longer window (it
then looks back before the current traffic step; the thresholds are rates, so older
traffic dilutes a bad canary rather than inventing one). ``increase()`` also extrapolates
to the window edges, so counts are estimates within about one scrape interval's worth of
traffic; a canary series born inside the window (its first request, its first 5xx) loses
up to one interval of its first traffic. Every query of one window is evaluated at the
same instant, so the errors never belong to a later scrape than the total.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import requests

from kubeml.errors import ConfigError, ServingError
from kubeml.serving.inferenceservice import Mode, PredictorConfig, predictor_spec
from kubeml.serving.rollout.engine import BackendMetrics, WindowMetrics

__all__ = ["InferenceServiceBackend", "PrometheusMetrics"]

_GROUP, _VERSION, _PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


class PrometheusMetrics:
    """Reads per-version request, error, latency and prediction metrics from Prometheus.

    The series are the ones the kubeml model server exports (``kubeml.serving.telemetry``):
    ``kubeml_requests_total{model,version,status}``, the
    ``kubeml_request_latency_seconds`` histogram and ``kubeml_predictions_total{class}``.
    ``namespace`` (the ``namespace`` target label a ServiceMonitor or PodMonitor adds;
    ``namespace_label`` when a scrape config names it differently) keeps two tenants that
    serve the same model name and version from being summed together.
    """

    #: Scrapes a window spans at least; see the module docstring.
    MIN_SCRAPES_PER_WINDOW = 4

    def __init__(
        self,
        url: str,
        *,
        scrape_interval_s: float = 30.0,
        namespace_label: str = "namespace",
        timeout_s: float = 10.0,
    ):
        """``scrape_interval_s`` is the interval of the ServiceMonitor/PodMonitor scraping
        the model servers (the platform chart's default is 30 s)."""
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"Prometheus URL must start with http:// or https://, got {url!r}")
        if scrape_interval_s <= 0:
            raise ConfigError(f"scrape_interval_s must be > 0 seconds, got {scrape_interval_s}")
        if not _LABEL_NAME.match(namespace_label):
            raise ConfigError(f"namespace_label {namespace_label!r} is not a Prometheus label name")
        self.url = url.rstrip("/")
        self.scrape_interval_s = scrape_interval_s
        self.namespace_label = namespace_label
        self.timeout_s = timeout_s

    @property
    def min_window_s(self) -> float:
        """Shortest window measured: :attr:`MIN_SCRAPES_PER_WINDOW` scrape intervals."""
        return self.MIN_SCRAPES_PER_WINDOW * self.scrape_interval_s

    def query(self, promql: str, *, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (at unix time ``at``, default now); the ``result`` vector."""
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            r = requests.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout_s)
            body = r.json()
        except (requests.RequestException, ValueError) as exc:
            raise ServingError(f"Prometheus query failed at {self.url}: {exc}") from exc
        if r.status_code != 200 or body.get("status") != "success":
            # A 400 carries the PromQL error in the body: report it, not just the status.
            raise ServingError(
                f"Prometheus rejected {promql!r} ({r.status_code}): "
                f"{body.get('errorType', '')} {body.get('error', '')}".rstrip()
            )
        return body["data"]["result"]

    def scalar(self, promql: str, *, at: float | None = None) -> float:
        result = self.query(promql, at=at)
        if not result:
            return 0.0
        value = float(result[0]["value"][1])
        return 0.0 if value != value else value  # NaN (no samples) counts as 0

    def window(
        self,
        model: str,
        stable: str,
        canary: str,
        window_s: float,
        *,
        namespace: str | None = None,
        at: float | None = None,
    ) -> WindowMetrics:
        """Stable and canary traffic over the ``window_s`` seconds (at least
        :attr:`min_window_s`) up to ``at`` (Unix seconds; None: now), from the series of
        ``namespace`` (None: every namespace).

        Every query of one window is evaluated at that one instant. Two windows asked for
        the same ``at`` read the same samples, so they can be compared request for request.
        """
        span = max(float(window_s), self.min_window_s)
        w = f"{math.ceil(span * 1000)}ms"
        at = time.time() if at is None else float(at)
        scope = f',{self.namespace_label}="{_quote(namespace)}"' if namespace is not None else ""

        def selector(version: str) -> str:
            return f'model="{_quote(model)}",version="{_quote(version)}"{scope}'

        def side(version: str) -> BackendMetrics:
            sel = selector(version)
            total = self.scalar(f"sum(increase(kubeml_requests_total{{{sel}}}[{w}]))", at=at)
            # 504s on a client's own deadline are not the version's errors (see the server's
            # kubeml_client_deadline_expired_total); never below zero at a window's edge.
            errors = max(0.0, self.scalar(
                f'sum(increase(kubeml_requests_total{{{sel},status=~"5.."}}[{w}])) - '
                f'(sum(increase(kubeml_client_deadline_expired_total{{{sel}}}[{w}])) or vector(0))', at=at
            ))
            buckets = f"sum by (le) (rate(kubeml_request_latency_seconds_bucket{{{sel}}}[{w}]))"
            p50 = self.scalar(f"histogram_quantile(0.5, {buckets})", at=at) * 1000
            p99 = self.scalar(f"histogram_quantile(0.99, {buckets})", at=at) * 1000
            return BackendMetrics(int(round(total)), int(round(errors)), p50, p99)

        def classes(version: str) -> dict[str, float]:
            rows = self.query(
                f"sum by (class) (increase(kubeml_predictions_total{{{selector(version)}}}[{w}]))",
                at=at,
            )
            return {r["metric"].get("class", ""): float(r["value"][1]) for r in rows}

        s, c = classes(stable), classes(canary)
        s_total, c_total = sum(s.values()), sum(c.values())
        compared = differing = 0
        if s_total and c_total:
            tvd = 0.5 * sum(abs(s.get(k, 0) / s_total - c.get(k, 0) / c_total) for k in set(s) | set(c))
            compared = int(round(c_total))
            differing = int(round(tvd * compared))
        return WindowMetrics(side(stable), side(canary), compared, differing, span)


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _quote(value: str) -> str:
    """A label value inside a PromQL double-quoted string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
        return self.prometheus.window(
            self.model,
            self.stable_version,
            self.canary_version,
            time.time() - since,
            namespace=self.namespace,
        )

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
