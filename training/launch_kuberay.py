"""KubeRay launcher: a ``RayJob`` for EKS GPU node groups, submitted and followed.

The job's head runs ``python -m kubeml.training.ray_main`` (the same :func:`fit` as a local
run) against a Ray cluster of one head and one worker group. Workers land on an EKS
managed node group (``eks.amazonaws.com/nodegroup``), request GPUs (and, on p4d, EFA
interfaces ``vpc.amazonaws.com/efa`` for NCCL over EFA), tolerate the GPU taint, and may
run on spot capacity. Spot is only allowed with an ``s3://`` artifact store: checkpoints
then outlive the node, and an interruption costs at most ``checkpoint_every_epochs``.

Only :func:`submit_and_follow` and :func:`server_dry_run` talk to the Kubernetes API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubeml.config import EnvironmentConfig, TrainingConfig
from kubeml.errors import ConfigError, KubemlError

__all__ = ["KubeRayOptions", "rayjob_manifest", "server_dry_run", "submit_and_follow"]

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
NODEGROUP_LABEL = "eks.amazonaws.com/nodegroup"
CAPACITY_LABEL = "eks.amazonaws.com/capacityType"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
#: RayJob states after which nothing changes (KubeRay ``JobDeploymentStatus`` / Ray ``JobStatus``).
DONE_DEPLOYMENT = {"Complete", "Failed"}
DONE_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}


class KubeRayOptions(BaseModel):
    """``training.launcher`` keys for ``target: kuberay``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = "kubeml"
    image: str = "kubeml/train:0.1.0"
    """Image with kubeml and its Ray/PyTorch installed (Ray version equal to ``ray_version``)."""
    ray_version: str = "2.60.0"
    service_account: str = "kubeml-train"
    """Service account with IRSA access to the artifact bucket."""
    node_group: str = "gpu-p4d"
    """EKS managed node group of the workers (``eks.amazonaws.com/nodegroup``)."""
    head_node_group: str | None = "cpu"
    """Node group of the head (no GPU); None: anywhere."""
    gpus_per_worker: int = Field(1, ge=0)
    """``nvidia.com/gpu`` per worker pod; 0 for CPU-only training."""
    cpus_per_worker: str = "10"
    memory_per_worker: str = "100Gi"
    efa_per_worker: int = Field(0, ge=0)
    """EFA interfaces per worker pod; a p4d.24xlarge has 4 (one pod per node uses all)."""
    shm_size: str = "32Gi"
    """/dev/shm size: NCCL and DataLoader workers exchange tensors through shared memory."""
    spot: bool = False
    """Run workers on spot capacity (``eks.amazonaws.com/capacityType: SPOT``)."""
    tolerations: tuple[dict[str, str], ...] = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)
    backoff_limit: int = Field(2, ge=0)
    """Job submissions KubeRay retries (each a new Ray cluster); the run resumes from S3 each time."""

    @classmethod
    def from_training(cls, tc: TrainingConfig) -> KubeRayOptions:
        try:
            return cls.model_validate(tc.launcher)
        except ValidationError as exc:
            problems = "; ".join(f"training.launcher.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid KubeRay launcher options: {problems}; allowed keys: {', '.join(sorted(cls.model_fields))}") from None


def _name(run_id: str) -> str:
    """A DNS-1123 name from a run id (lower case, at most 63 characters)."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", run_id.lower()).strip("-")
    return ("kubeml-" + name)[:63].rstrip("-")


def rayjob_manifest(
    cfg: EnvironmentConfig,
    *,
    run_id: str,
    dataset: str,
    dataset_version: str,
    options: KubeRayOptions | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """The ``RayJob`` that runs ``fit`` for this configuration on a KubeRay cluster."""
    opts = options or KubeRayOptions.from_training(cfg.training)
    tc = cfg.training
    if opts.spot and not cfg.artifact_store.uri.startswith("s3://"):
        raise ConfigError(
            "spot workers need checkpoints that outlive the node: set artifact_store.uri to s3://... "
            "or training.launcher.spot: false"
        )
    if tc.use_gpu and opts.gpus_per_worker == 0:
        raise ConfigError("training.use_gpu is true but training.launcher.gpus_per_worker is 0; request at least 1 GPU")
    worker_cfg = cfg.model_copy(update={"training": tc.model_copy(update={"target": "local"})})
    env_vars = {
        "KUBEML_CONFIG": worker_cfg.model_dump_json(),
        "KUBEML_RUN_ID": run_id,
        "KUBEML_DATASET": dataset,
        "KUBEML_DATASET_VERSION": dataset_version,
    }
    if resume:
        env_vars["KUBEML_RESUME"] = "1"
    limits: dict[str, str] = {"cpu": opts.cpus_per_worker, "memory": opts.memory_per_worker}
    if opts.gpus_per_worker:
        limits["nvidia.com/gpu"] = str(opts.gpus_per_worker)
    if opts.efa_per_worker:
        limits[EFA_RESOURCE] = str(opts.efa_per_worker)
    worker_selector = {NODEGROUP_LABEL: opts.node_group}
    if opts.spot:
        worker_selector[CAPACITY_LABEL] = "SPOT"
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}
    labels = {"app.kubernetes.io/name": "kubeml", "app.kubernetes.io/component": "training", "kubeml.io/run-id": _name(run_id)[7:]}

    def container(name: str, resources: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "image": opts.image,
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            # Ray stops cleanly on SIGTERM; give in-flight checkpoint uploads time to finish.
            "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
        }

    head_spec: dict[str, Any] = {
        "serviceAccountName": opts.service_account,
        "containers": [container("ray-head", {"cpu": opts.head_cpu, "memory": opts.head_memory})],
        "volumes": [shm],
    }
    if opts.head_node_group:
        head_spec["nodeSelector"] = {NODEGROUP_LABEL: opts.head_node_group}
    worker_spec = {
        "serviceAccountName": opts.service_account,
        "nodeSelector": worker_selector,
        "tolerations": [dict(t) for t in opts.tolerations],
        "containers": [container("ray-worker", limits)],
        "volumes": [shm],
        # A spot node gets a 2-minute warning; 120 s lets the worker finish its step and Ray report.
        "terminationGracePeriodSeconds": 120 if opts.spot else 30,
    }
    spec: dict[str, Any] = {
        "entrypoint": "python -m kubeml.training.ray_main",
        "runtimeEnvYAML": json.dumps({"env_vars": env_vars}),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_seconds_after_finished,
        "backoffLimit": opts.backoff_limit,
        "rayClusterSpec": {
            "rayVersion": opts.ray_version,
            "headGroupSpec": {
                # The head schedules no training: all GPUs and CPUs for workers.
                "rayStartParams": {"num-cpus": "0"},
                "template": {"metadata": {"labels": labels}, "spec": head_spec},
            },
            "workerGroupSpecs": [{
                "groupName": "gpu" if opts.gpus_per_worker else "cpu",
                "replicas": tc.workers,
                "minReplicas": tc.workers,
                "maxReplicas": tc.workers,
                "rayStartParams": {},
                "template": {"metadata": {"labels": labels}, "spec": worker_spec},
            }],
        },
    }
    if opts.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = opts.active_deadline_seconds
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {"name": _name(run_id), "namespace": opts.namespace, "labels": labels},
        "spec": spec,
    }


def _api(api_client: Any | None):
    from kubernetes import client, config

    if api_client is not None:
        return client.CustomObjectsApi(api_client)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def server_dry_run(manifest: dict[str, Any], *, namespace: str, api_client: Any | None = None) -> dict[str, Any]:
    """Ask the apiserver to validate ``manifest`` against the CRD schema without storing it."""
    group, version = manifest["apiVersion"].split("/")
    plural = manifest["kind"].lower() + "s"
    return _api(api_client).create_namespaced_custom_object(group, version, namespace, plural, manifest, dry_run="All")


def _status_of(obj: dict[str, Any]) -> tuple[str, bool, bool]:
    """(text, done, succeeded) from a RayJob or SageMaker TrainingJob object."""
    st = obj.get("status") or {}
    if obj.get("kind") == "TrainingJob":
        s = st.get("trainingJobStatus", "")
        secondary = st.get("secondaryStatus", "")
        return (f"{s} {secondary}".strip() or "Pending"), s in ("Completed", "Failed", "Stopped"), s == "Completed"
    dep, job = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    text = " / ".join(x for x in (dep, job) if x) or "Pending"
    done = dep in DONE_DEPLOYMENT or job in DONE_JOB
    return text, done, job == "SUCCEEDED" or (dep == "Complete" and job in ("", "SUCCEEDED"))


def submit_and_follow(
    manifest: dict[str, Any],
    *,
    namespace: str,
    timeout_s: float = 24 * 3600.0,
    poll_s: float = 5.0,
    on_status: Callable[[str], None] | None = None,
    api_client: Any | None = None,
) -> str:
    """Create the job (or attach to it if it exists: a resubmission follows the same run) and
    poll its status until it is done; return the final status or raise ``KubemlError``."""
    from kubernetes.client.exceptions import ApiException

    api = _api(api_client)
    group, version = manifest["apiVersion"].split("/")
    plural = manifest["kind"].lower() + "s"
    name = manifest["metadata"]["name"]
    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    try:
        api.create_namespaced_custom_object(group, version, namespace, plural, body)
    except ApiException as exc:
        if exc.status != 409:
            raise KubemlError(f"creating {manifest['kind']} {namespace}/{name} failed ({exc.status}): {exc.body}") from exc
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            obj = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            raise KubemlError(f"reading {manifest['kind']} {namespace}/{name} failed ({exc.status})") from exc
        text, done, ok = _status_of(obj)
        if text != last and on_status:
            on_status(text)
        last = text
        if done:
            if not ok:
                msg = (obj.get("status") or {}).get("message") or (obj.get("status") or {}).get("failureReason", "")
                raise KubemlError(f"{manifest['kind']} {namespace}/{name} ended {text}: {msg}")
            return text
        if time.monotonic() > deadline:
            raise KubemlError(f"{manifest['kind']} {namespace}/{name} still {text} after {timeout_s:.0f} s; "
                              f"it keeps running: kubectl -n {namespace} get {plural} {name}")
        time.sleep(poll_s)
