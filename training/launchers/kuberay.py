"""KubeRay launcher: a ``RayJob`` for EKS GPU node groups, submitted and followed.

The job's head runs ``python -m kubeml.training.ray_main`` (the same :func:`fit` as a local
run) against a Ray cluster of one head and one worker group. Workers land on an EKS
managed node group (``eks.amazonaws.com/nodegroup``), request GPUs (and, on p4d, EFA
interfaces ``vpc.amazonaws.com/efa`` for NCCL over EFA), tolerate the GPU taint, and may
run on spot capacity. Spot is only allowed with an ``s3://`` artifact store: checkpoints
then outlive the node, and an interruption costs at most ``checkpoint_every_epochs``.

Where it sits: this module builds the manifest and names the launcher
(:class:`KubeRayLauncher`, ``training.target: kuberay``);
:mod:`kubeml.training.launchers._jobs` creates the ``RayJob`` and follows its status, and
:mod:`kubeml.training.launchers._contract` holds the artifact contract: the job's entrypoint
writes the model bundle to ``models/RUN_ID/bundle`` in the (S3) artifact store of
``KUBEML_CONFIG``, where the train stage and the evaluate/register steps after it read it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubeml._kube import read_only_root_scratch, restricted_container_security, restricted_pod_security
from kubeml.config import EnvironmentConfig, TrainingConfig
from kubeml.errors import ConfigError
from kubeml.images import image_ref
from kubeml.training.launchers._cluster import ClusterLauncher

__all__ = ["KubeRayLauncher", "KubeRayOptions", "rayjob_manifest", "rayjob_name"]

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
NODEGROUP_LABEL = "eks.amazonaws.com/nodegroup"
CAPACITY_LABEL = "eks.amazonaws.com/capacityType"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
#: KubeRay refuses longer RayJob names (``ValidationFailed``): it appends 6 characters for the
#: RayCluster, whose name is capped at 53 so that its Service names stay DNS labels.
MAX_RAYJOB_NAME = 47
#: ``home`` of the configuration the job's pods get: under their writable /tmp emptyDir.
POD_HOME = "/tmp/kubeml"


class KubeRayOptions(BaseModel):
    """``training.launcher`` keys for ``target: kuberay``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = "kubeml"
    image: str = Field(default_factory=lambda: image_ref("runtime"))
    """Image with kubeml and its Ray/PyTorch installed (Ray version equal to ``ray_version``):
    the runtime image, ``images/runtime.Containerfile``."""
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
    """CPU request of a worker pod; also its limit unless ``worker_cpu_limit`` says otherwise."""
    worker_cpu_limit: str | None = None
    """CPU limit of a worker pod, at least ``cpus_per_worker``. None: the request (Guaranteed QoS)."""
    memory_per_worker: str = "100Gi"
    efa_per_worker: int = Field(0, ge=0)
    """EFA interfaces per worker pod; a p4d.24xlarge has 4 (one pod per node uses all)."""
    shm_size: str = "32Gi"
    """/dev/shm size: NCCL and DataLoader workers exchange tensors through shared memory."""
    spot: bool = False
    """Run workers on spot capacity (``eks.amazonaws.com/capacityType: SPOT``)."""
    tolerations: tuple[dict[str, str], ...] = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    head_tolerations: tuple[dict[str, str], ...] = ()
    """Tolerations of the head pod (its node group is usually untainted)."""
    head_cpu: str = "2"
    head_cpu_limit: str | None = None
    """CPU limit of the head, at least ``head_cpu``. None: the request (Guaranteed QoS).

    Ray starts a dozen processes at once on a node and gives its raylet 30 s to register
    with the GCS, or ``ray start`` exits and the pod restarts. A head (or worker) of under
    a core, throttled to its request, can miss that on a busy node; a limit above the
    request lets it start on spare CPU while the scheduler still counts the request."""
    head_memory: str = "8Gi"
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)
    backoff_limit: int = Field(2, ge=0)
    """Job submissions KubeRay retries (each a new Ray cluster); the run resumes from S3 each time."""
    wait_timeout_s: float | None = Field(None, gt=0)
    """Seconds the train step (or ``kubeml train``) waits for the job before giving up (the job
    keeps running; a retried step adopts it). None: ``active_deadline_seconds`` plus an hour
    for scheduling, else 24 hours."""
    poll_s: float = Field(10.0, gt=0)
    """Seconds between two status reads of the RayJob while waiting."""
    stall_timeout_s: float = Field(1800.0, gt=0)
    """Seconds the Ray cluster may take to come up (GPU nodes added, images pulled) before the
    job is reported stalled with its cause (an unschedulable pod, a head never Ready)."""
    image_grace_s: float = Field(120.0, gt=0)
    """Seconds a Ray pod may fail to get its image before the job is reported stalled."""
    artifact_endpoint_url: str | None = None
    """The S3 endpoint as the job's pods reach it, where that differs from
    ``artifact_store.endpoint_url`` (a MinIO or moto the submitting machine reaches on
    loopback, the pods through a Service or the node's address). None: the same endpoint."""
    env_secret: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    """A Secret in ``namespace`` whose keys become environment variables of the head, the
    workers and the submitter: S3 credentials (``AWS_ACCESS_KEY_ID``, ...) where IRSA is not
    there to give them. None: the service account's IRSA role is the only credential."""
    submitter_cpu: str = "500m"
    submitter_cpu_limit: str | None = None
    """CPU limit of the submitter pod, at least ``submitter_cpu``. None: the request."""
    submitter_memory: str = "1Gi"
    """Resources of KubeRay's submitter pod (``ray job submit``, then following the job's logs)."""
    submitter_backoff_limit: int = Field(2, ge=0)
    """Retries of the submitter pod within one submission (KubeRay's ``submitterConfig``):
    a submitter that cannot reach the head's dashboard yet (a head restarting) is retried
    before the submission counts as failed. It resubmits only a job the head does not know."""

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> KubeRayOptions:
        for request, limit in (("cpus_per_worker", "worker_cpu_limit"), ("head_cpu", "head_cpu_limit"),
                               ("submitter_cpu", "submitter_cpu_limit")):
            cap = getattr(self, limit)
            if cap is not None and _cpu_cores(cap, limit) < _cpu_cores(getattr(self, request), request):
                raise ValueError(f"{limit} {cap} is below {request} {getattr(self, request)}: "
                                 "a limit must be at least the request")
        return self

    @property
    def effective_wait_timeout_s(self) -> float:
        if self.wait_timeout_s is not None:
            return self.wait_timeout_s
        return self.active_deadline_seconds + 3600.0 if self.active_deadline_seconds else 24 * 3600.0

    @classmethod
    def from_training(cls, tc: TrainingConfig) -> KubeRayOptions:
        try:
            return cls.model_validate(tc.launcher)
        except ValidationError as exc:
            problems = "; ".join("training.launcher" + "".join(f".{part}" for part in e["loc"]) + f": {e['msg']}"
                                 for e in exc.errors())
            raise ConfigError(f"invalid KubeRay launcher options: {problems}; allowed keys: {', '.join(sorted(cls.model_fields))}") from None


def rayjob_name(run_id: str) -> str:
    """The RayJob's name for a run: ``kubeml-<run id>`` as a DNS-1035 label KubeRay accepts.

    Run ids too long for :data:`MAX_RAYJOB_NAME` are cut and given a hash of the whole id, so
    two long run ids sharing a prefix never map to the same job (which would be adopted).
    """
    safe = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", run_id.lower())).strip("-")
    if not safe:
        raise ConfigError(f"run id {run_id!r} has no letters or digits to name a RayJob after")
    name = "kubeml-" + safe
    if len(name) <= MAX_RAYJOB_NAME:
        return name
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return name[: MAX_RAYJOB_NAME - 9].rstrip("-") + "-" + digest


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
    # Ray Train places one training worker per GPU. A pod with gpus_per_worker GPUs hosts that
    # many Ray workers, so the job's Ray Train worker count is pods x GPUs per pod: 2 pods of 8
    # GPUs train on 16 workers, not on 2 workers of one GPU each with 14 GPUs idle.
    ray_workers = tc.workers * opts.gpus_per_worker if tc.use_gpu else tc.workers
    if tc.use_gpu:
        pod_cpus = _cpu_cores(opts.cpus_per_worker)
        if tc.cpus_per_worker * opts.gpus_per_worker > pod_cpus:
            raise ConfigError(
                f"training.cpus_per_worker {tc.cpus_per_worker:g} x gpus_per_worker {opts.gpus_per_worker} "
                f"needs {tc.cpus_per_worker * opts.gpus_per_worker:g} CPUs per pod, but "
                f"training.launcher.cpus_per_worker is {opts.cpus_per_worker}: raise the pod's CPUs or "
                "lower training.cpus_per_worker (CPUs per Ray worker, one per GPU)")
    worker_cfg = cfg.model_copy(update={
        "training": tc.model_copy(update={"target": "local", "workers": ray_workers}),
        # The submitting machine's paths mean nothing in the pods; their writable scratch is /tmp.
        "home": POD_HOME,
        "artifact_store": _pod_artifact_store(cfg, opts),
    })
    env_vars = {
        "KUBEML_CONFIG": worker_cfg.model_dump_json(),
        "KUBEML_RUN_ID": run_id,
        "KUBEML_DATASET": dataset,
        "KUBEML_DATASET_VERSION": dataset_version,
    }
    if resume:
        env_vars["KUBEML_RESUME"] = "1"
    worker_resources: dict[str, str] = {"cpu": opts.cpus_per_worker, "memory": opts.memory_per_worker}
    if opts.gpus_per_worker:
        worker_resources["nvidia.com/gpu"] = str(opts.gpus_per_worker)
    if opts.efa_per_worker:
        worker_resources[EFA_RESOURCE] = str(opts.efa_per_worker)
    worker_selector = {NODEGROUP_LABEL: opts.node_group}
    if opts.spot:
        worker_selector[CAPACITY_LABEL] = "SPOT"
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}
    # The root filesystem is read-only; Ray writes its session directory (logs, spilled
    # objects) under /tmp, an emptyDir.
    tmp_volume, tmp_mount = read_only_root_scratch()
    name = rayjob_name(run_id)
    labels = {"app.kubernetes.io/name": "kubeml", "app.kubernetes.io/component": "training", "kubeml.io/run-id": name[7:]}

    env_from = [{"secretRef": {"name": opts.env_secret}}] if opts.env_secret else []

    def container(name: str, resources: dict[str, str], cpu_limit: str | None,
                  health: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name,
            "image": opts.image,
            "resources": _resources(resources, cpu_limit),
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, dict(tmp_mount)],
            "securityContext": {**restricted_container_security(), "readOnlyRootFilesystem": True},
            # Ray stops cleanly on SIGTERM; give in-flight checkpoint uploads time to finish.
            "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
            **_ray_probes(*health),
        }
        if env_from:
            c["envFrom"] = [dict(e) for e in env_from]
        return c

    # Tenant namespaces enforce Pod Security "restricted"; head and workers must pass it.
    head_spec: dict[str, Any] = {
        "serviceAccountName": opts.service_account,
        "securityContext": restricted_pod_security(),
        "containers": [container("ray-head", {"cpu": opts.head_cpu, "memory": opts.head_memory},
                                 opts.head_cpu_limit, RAY_HEAD_HEALTH)],
        "volumes": [shm, tmp_volume],
    }
    if opts.head_node_group:
        head_spec["nodeSelector"] = {NODEGROUP_LABEL: opts.head_node_group}
    if opts.head_tolerations:
        head_spec["tolerations"] = [dict(t) for t in opts.head_tolerations]
    worker_spec = {
        "serviceAccountName": opts.service_account,
        "securityContext": restricted_pod_security(),
        "nodeSelector": worker_selector,
        "tolerations": [dict(t) for t in opts.tolerations],
        "containers": [container("ray-worker", worker_resources, opts.worker_cpu_limit, RAY_WORKER_HEALTH)],
        "volumes": [shm, tmp_volume],
        # A spot node gets a 2-minute warning; 120 s lets the worker finish its step and Ray report.
        "terminationGracePeriodSeconds": 120 if opts.spot else 30,
    }
    # KubeRay's own submitter pod (K8sJobMode) would have no security context, and a tenant
    # namespace's Pod Security "restricted" refuses it; KubeRay fills in its command.
    submitter_resources = {"cpu": opts.submitter_cpu, "memory": opts.submitter_memory}
    submitter_container: dict[str, Any] = {
        "name": "ray-job-submitter",
        "image": opts.image,
        "resources": _resources(submitter_resources, opts.submitter_cpu_limit),
        "volumeMounts": [dict(tmp_mount)],
        "securityContext": {**restricted_container_security(), "readOnlyRootFilesystem": True},
    }
    if env_from:
        submitter_container["envFrom"] = [dict(e) for e in env_from]
    submitter = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": opts.service_account,
            "securityContext": restricted_pod_security(),
            "restartPolicy": "Never",
            "containers": [submitter_container],
            "volumes": [tmp_volume],
            **({"nodeSelector": {NODEGROUP_LABEL: opts.head_node_group}} if opts.head_node_group else {}),
            **({"tolerations": [dict(t) for t in opts.head_tolerations]} if opts.head_tolerations else {}),
        },
    }
    spec: dict[str, Any] = {
        "entrypoint": "python -m kubeml.training.ray_main",
        "submitterPodTemplate": submitter,
        "runtimeEnvYAML": json.dumps({"env_vars": env_vars}),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_seconds_after_finished,
        "backoffLimit": opts.backoff_limit,
        "submitterConfig": {"backoffLimit": opts.submitter_backoff_limit},
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
                # Every GPU of the pod is Ray's to place a training worker on.
                "rayStartParams": {"num-gpus": str(opts.gpus_per_worker)} if opts.gpus_per_worker else {},
                "template": {"metadata": {"labels": labels}, "spec": worker_spec},
            }],
        },
    }
    if opts.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = opts.active_deadline_seconds
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        # The full run id (labels are cut to 63 characters): the launcher adopts an existing
        # RayJob of this name only if it belongs to the same run.
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels,
                     "annotations": {"kubeml.io/run-id": run_id}},
        "spec": spec,
    }


#: Ray's health endpoints (its default ports): the GCS through the head's dashboard, a node's
#: raylet through its dashboard agent (head and workers alike).
GCS_HEALTH = {"httpGet": {"path": "/api/gcs_healthz", "port": 8265}}
RAYLET_HEALTH = {"httpGet": {"path": "/api/local_raylet_healthz", "port": 52365}}
AGENT_LISTENING = {"tcpSocket": {"port": 52365}}
#: (readiness, liveness) per role. The head is ready when the GCS answers and alive while its
#: raylet does; a worker is ready when its raylet answers and alive while its agent listens.
RAY_HEAD_HEALTH = (GCS_HEALTH, RAYLET_HEALTH)
RAY_WORKER_HEALTH = (RAYLET_HEALTH, AGENT_LISTENING)


def _ray_probes(readiness: dict[str, Any], liveness: dict[str, Any]) -> dict[str, Any]:
    """Readiness and liveness probes of a Ray container, made by the kubelet.

    KubeRay's own probes run ``wget`` inside the container, which a slim image (ours among
    them) does not have: every probe fails and the head never becomes Ready. A container that
    names its probes keeps them. Timings as KubeRay's: ready within 10 failed checks, restarted
    only after 120 (10 minutes), so a busy head is not killed mid-job.
    """
    timing = {"timeoutSeconds": 2, "periodSeconds": 5}
    return {"readinessProbe": {**readiness, **timing, "initialDelaySeconds": 10, "failureThreshold": 10},
            "livenessProbe": {**liveness, **timing, "initialDelaySeconds": 30, "failureThreshold": 120}}


def _resources(requests: dict[str, str], cpu_limit: str | None) -> dict[str, dict[str, str]]:
    """Requests and limits of a container: the same, but for a CPU limit above the request."""
    limits = dict(requests)
    if cpu_limit is not None:
        limits["cpu"] = cpu_limit
    return {"requests": dict(requests), "limits": limits}


def _pod_artifact_store(cfg: EnvironmentConfig, opts: KubeRayOptions) -> Any:
    """The artifact store settings as the job's pods see them (``artifact_endpoint_url``).

    A loopback endpoint is the submitting machine's own: in a pod it names the pod itself,
    and every checkpoint upload would fail after the Ray cluster came up, so it is refused here.
    """
    store = cfg.artifact_store
    endpoint = opts.artifact_endpoint_url or store.endpoint_url
    if endpoint and _is_loopback(endpoint):
        raise ConfigError(
            f"artifact_store.endpoint_url {endpoint} is a loopback address, which the job's pods cannot "
            "reach (in a pod it is the pod itself): set training.launcher.artifact_endpoint_url to the "
            "endpoint as the pods reach it (a Service, or the node's address)")
    return store.model_copy(update={"endpoint_url": endpoint})


def _is_loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cpu_cores(quantity: str, key: str = "cpus_per_worker") -> float:
    """A Kubernetes CPU quantity ("10", "500m", "2.5") in cores."""
    text = str(quantity).strip()
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        cores = float("nan")
    if not cores > 0:
        raise ConfigError(f"training.launcher.{key} {quantity!r} is not a CPU quantity above 0 "
                          "(cores such as 10 or 2.5, or millicores such as 500m)")
    return cores


class KubeRayLauncher(ClusterLauncher):
    """``training.target: kuberay``: a ``RayJob`` on the cluster, followed to the end."""

    name = "kuberay"
    options_type = KubeRayOptions
    build = staticmethod(rayjob_manifest)
