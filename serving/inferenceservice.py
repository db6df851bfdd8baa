"""KServe ``InferenceService`` manifests for the kubeml model server (cluster target).

Where it sits: pure functions from validated config objects to plain dicts; nothing here
talks to the API server (the rollout's cluster backend applies and patches them). The
predictor is a custom container running ``python -m kubeml.serving.server``, so the
cluster serves exactly the code the local target runs; KServe's storage initializer
downloads the bundle (``STORAGE_URI``) to ``/mnt/models`` before the server starts.

Two deployment modes, both with a canary:

* ``knative``: one predictor; a new version replaces ``spec.predictor`` and
  ``spec.predictor.canaryTrafficPercent`` splits traffic between the last rolled-out
  revision and the new one (KServe keeps the old revision).
* ``standard`` (KServe >= 0.20, plain Deployments): ``spec.predictor`` stays the stable
  version and ``spec.canary`` lists ``{predictor, trafficPercent}`` for the new one.

>>> from kubeml.images import image_ref
>>> p = PredictorConfig(image=image_ref("server"), storage_uri="s3://m/digits/3",
...                     model_name="digits", version="3")
>>> isvc = inference_service("digits", p, mode="standard")
>>> isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
'Standard'
>>> isvc["spec"]["predictor"]["containers"][0]["args"][:2]
['-m', 'kubeml.serving.server']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from kubeml._kube import read_only_root_scratch, restricted_container_security, restricted_pod_security

__all__ = [
    "GPU_NODE_SELECTOR",
    "GPU_TOLERATION",
    "PayloadLoggerConfig",
    "PredictorConfig",
    "Resources",
    "inference_service",
    "predictor_spec",
    "with_canary",
]

Mode = Literal["knative", "standard"]
_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
_MODE_VALUE = {"knative": "Knative", "standard": "Standard"}
#: Where the Secret of inference tokens is mounted (``PredictorConfig.auth_secret``).
AUTH_MOUNT = "/var/run/kubeml/auth"
#: Where KServe's storage initializer puts the model for a custom container.
MODEL_MOUNT = "/mnt/models"
#: Label the NVIDIA GPU operator / EKS GPU AMIs put on GPU nodes.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
#: EKS GPU node groups are tainted so only GPU workloads land there.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class Resources:
    """Container resources. Defaults fit the digits CNN: ~300 MiB resident with torch."""

    cpu: str = "500m"
    """CPU request (limit is ``cpu_limit``)."""
    memory: str = "1Gi"
    """Memory request and limit: equal, so the pod is never OOM-killed for bursting."""
    cpu_limit: str | None = "2"
    gpus: int = 0
    """``nvidia.com/gpu`` per replica; > 0 also selects and tolerates GPU nodes."""
    ephemeral_storage: str | None = "1Gi"
    """Ephemeral-storage request: the server's logs and /tmp scratch, and the bundle KServe's
    storage initializer unpacks into the pod (an emptyDir, counted against the pod's limit)."""
    ephemeral_storage_limit: str | None = "10Gi"
    """Ephemeral-storage limit; the kubelet evicts a pod that writes more. Raise it for
    bundles larger than a few GiB. None (with ``ephemeral_storage`` None): unbounded."""

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if (self.ephemeral_storage is None) != (self.ephemeral_storage_limit is None):
            raise ValueError("set both ephemeral_storage and ephemeral_storage_limit, or neither")

    def to_dict(self) -> dict[str, Any]:
        requests: dict[str, str] = {"cpu": self.cpu, "memory": self.memory}
        limits: dict[str, str] = {"memory": self.memory}
        if self.cpu_limit:
            limits["cpu"] = self.cpu_limit
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        if self.ephemeral_storage is not None and self.ephemeral_storage_limit is not None:
            requests["ephemeral-storage"] = self.ephemeral_storage
            limits["ephemeral-storage"] = self.ephemeral_storage_limit
        return {"requests": requests, "limits": limits}


@dataclass(frozen=True)
class PayloadLoggerConfig:
    """KServe's payload logger: request/response CloudEvents to ``url`` (e.g. a Kafka
    bridge or the kubeml drift collector)."""

    url: str
    mode: Literal["all", "request", "response"] = "all"

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "mode": self.mode}


@dataclass(frozen=True)
class PredictorConfig:
    """One model version as a KServe predictor running the kubeml server."""

    image: str
    """The server image, ``kubeml.images.image_ref("server")`` (``images/server.Containerfile``)."""
    storage_uri: str
    """Bundle location (``s3://bucket/models/digits/3``), fetched by KServe's initializer."""
    model_name: str
    version: str
    resources: Resources = Resources()
    min_replicas: int = 1
    """Knative allows 0 (scale to zero); cold starts then cost the model load (~15 s)."""
    max_replicas: int = 3
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = "concurrency"
    scale_target: int = 8
    """Target per replica, in the metric's unit (in-flight requests for concurrency)."""
    payload_logger: PayloadLoggerConfig | None = None
    service_account: str | None = None
    """Service account with read access to the bundle (IRSA on EKS)."""
    grpc: bool = False
    """Also serve Open Inference Protocol gRPC on 8081."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Extra node selector; GPU selection is added when ``resources.gpus > 0``."""
    timeout_s: int = 60
    """Request timeout KServe enforces for the predictor."""
    auth_secret: str | None = None
    """Name of a Secret whose key ``tokens`` holds the bearer tokens inference needs (one
    per line). Mounted read-only and passed as ``--auth-token-file``; the server re-reads
    it when the kubelet updates the mount, so tokens rotate without a restart."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"replicas must satisfy 0 <= min ({self.min_replicas}) <= max "
                f"({self.max_replicas}) and max >= 1"
            )
        if self.scale_target < 1:
            raise ValueError(f"scale_target must be >= 1, got {self.scale_target}")
        if "://" not in self.storage_uri:
            raise ValueError(f"storage_uri must be a URI like s3://bucket/key, got {self.storage_uri!r}")


def predictor_spec(p: PredictorConfig) -> dict[str, Any]:
    """``spec.predictor`` for one version (a custom container)."""
    args = [
        "-m", "kubeml.serving.server",
        "--model-dir", MODEL_MOUNT,
        "--model-name", p.model_name,
        "--model-version", p.version,
        # In a pod the server must answer on the pod's address (the kubelet's probes, the
        # Service, queue-proxy); it binds loopback only by default.
        "--host", "0.0.0.0",
        "--http-port", "8080",
    ]  # fmt: skip
    ports = [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    if p.grpc:
        args += ["--grpc-port", "8081"]
        ports.append({"name": "h2c", "containerPort": 8081, "protocol": "TCP"})
    # The root filesystem is read-only; temporary files go to an emptyDir on /tmp.
    tmp_volume, tmp_mount = read_only_root_scratch()
    if p.auth_secret:
        args += ["--auth-token-file", f"{AUTH_MOUNT}/tokens"]
    container = {
        "name": "kserve-container",
        "image": p.image,
        "command": ["python"],
        "args": args,
        "env": [
            {"name": "STORAGE_URI", "value": p.storage_uri},
            {"name": "JE_ARROW_MALLOC_CONF", "value": "background_thread:false"},
        ],
        "ports": ports,
        "resources": p.resources.to_dict(),
        "securityContext": {**restricted_container_security(), "readOnlyRootFilesystem": True},
        "volumeMounts": [tmp_mount],
        "readinessProbe": {
            "httpGet": {"path": f"/v2/models/{p.model_name}/ready", "port": 8080},
            "periodSeconds": 5,
        },
        # Live while the weights load (the port opens at once), not live once the load
        # failed or the model was lost: then a restart is the cure, and only then.
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": 8080},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }
    if p.auth_secret:
        container["volumeMounts"].append({"name": "kubeml-auth", "mountPath": AUTH_MOUNT, "readOnly": True})
    spec: dict[str, Any] = {
        "minReplicas": p.min_replicas,
        "maxReplicas": p.max_replicas,
        "scaleMetric": p.scale_metric,
        "scaleTarget": p.scale_target,
        "timeout": p.timeout_s,
        "containers": [container],
        "volumes": [tmp_volume],
        # Tenant namespaces enforce Pod Security "restricted"; the predictor pod must pass it.
        "securityContext": restricted_pod_security(),
        "labels": {"kubeml.io/model": p.model_name, "kubeml.io/version": p.version},
    }
    if p.auth_secret:
        spec["volumes"].append({"name": "kubeml-auth", "secret": {"secretName": p.auth_secret}})
    selector = dict(p.node_selector)
    if p.resources.gpus:
        selector.update(GPU_NODE_SELECTOR)
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    if selector:
        spec["nodeSelector"] = selector
    if p.payload_logger is not None:
        spec["logger"] = p.payload_logger.to_dict()
    if p.service_account:
        spec["serviceAccountName"] = p.service_account
    return spec


def inference_service(
    name: str,
    predictor: PredictorConfig,
    *,
    mode: Mode = "knative",
    namespace: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An InferenceService serving ``predictor`` alone (no canary yet)."""
    if mode not in _MODE_VALUE:
        raise ValueError(f"mode must be one of {sorted(_MODE_VALUE)}, got {mode!r}")
    metadata: dict[str, Any] = {
        "name": name,
        "annotations": {
            _MODE_ANNOTATION: _MODE_VALUE[mode],
            # Scraped by Prometheus: the rollout analysis reads kubeml_* metrics.
            "serving.kserve.io/enable-prometheus-scraping": "true",
        },
        "labels": {"app.kubernetes.io/managed-by": "kubeml", **(labels or {})},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": predictor_spec(predictor)},
    }


def with_canary(
    isvc: dict[str, Any], canary: PredictorConfig, percent: int, *, mode: Mode | None = None
) -> dict[str, Any]:
    """A copy of ``isvc`` with ``canary`` receiving ``percent`` of the traffic.

    Knative mode replaces the predictor and sets ``canaryTrafficPercent`` (KServe routes
    the rest to the last rolled-out revision); standard mode keeps the predictor and adds
    ``spec.canary``.
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be 0..100, got {percent}")
    mode = mode or ("standard" if isvc["metadata"]["annotations"].get(_MODE_ANNOTATION) == "Standard" else "knative")
    out = copy.deepcopy(isvc)
    if mode == "knative":
        out["spec"]["predictor"] = {**predictor_spec(canary), "canaryTrafficPercent": percent}
    else:
        out["spec"]["canary"] = [{"predictor": predictor_spec(canary), "trafficPercent": percent}]
    return out
