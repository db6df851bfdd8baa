"""Validated configuration: ``kubeml.yaml``.

The file holds one block per environment (``dev``, ``staging``, ``prod``). Each block is
validated into an :class:`EnvironmentConfig`; keys left out take the defaults documented
on each field. Unknown keys and bad values are errors that name the key and what is
allowed, at load time, before any work starts.

    environments:
      dev:
        gate: {min_accuracy: 0.95}
      prod:
        approval: manual
        artifact_store: {uri: s3://ml-artifacts/kubeml}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kubeml.errors import ConfigError

__all__ = [
    "ENVIRONMENTS",
    "ArtifactStoreConfig",
    "DataConfig",
    "EnvironmentConfig",
    "GateConfig",
    "KubeflowConfig",
    "TaskConfig",
    "KubemlConfig",
    "RegistryConfig",
    "ServingConfig",
    "SigningConfig",
    "TrainingConfig",
    "ValidationConfig",
    "load_config",
]

ENVIRONMENTS = ("dev", "staging", "prod")
DEFAULT_HOME = ".kubeml"
"""Where local state lives (artifacts, MLflow DB, server state), relative to the config file."""


class _Strict(BaseModel):
    # extra="forbid": a typo in kubeml.yaml must fail loudly, not be silently ignored.
    # frozen: a config is a value; stages receive it and must not change it.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactStoreConfig(_Strict):
    uri: str = f"file://{DEFAULT_HOME}/artifacts"
    """``file://PATH`` (relative paths resolve against the config file) or ``s3://BUCKET/PREFIX``."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto); None uses AWS with the default credential chain (IRSA on EKS)."""
    sse_kms_key_id: str | None = None
    """KMS key id or ARN that every object is written with (S3 SSE-KMS); ``s3://`` stores only.
    None: the bucket's default encryption applies."""

    def open(self):  # -> kubeml.artifacts.ArtifactStore
        """The artifact store these settings describe."""
        from kubeml.artifacts import open_store

        return open_store(self.uri, endpoint_url=self.endpoint_url, sse_kms_key_id=self.sse_kms_key_id)

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("file://") or v.startswith("s3://")):
            raise ValueError("must start with file:// or s3:// (allowed schemes: file, s3)")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("s3:// URI needs a bucket, e.g. s3://my-bucket/kubeml")
        return v


class RegistryConfig(_Strict):
    tracking_uri: str = f"sqlite:///{DEFAULT_HOME}/mlflow.db"
    """MLflow tracking/registry URI; ``sqlite:///`` relative paths resolve against the config file."""
    model_name: str = Field("digits-cnn", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    """Registered model name; also the served model name (so it must be a DNS label)."""


class ValidationConfig(_Strict):
    expected_features: int = Field(64, ge=1)
    """Number of feature columns the schema requires."""
    min_value: float = 0.0
    """Smallest allowed feature value (digits pixels are counts 0..16)."""
    max_value: float = 16.0
    """Largest allowed feature value."""
    max_missing_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Largest allowed fraction of missing (NaN) cells."""
    min_rows: int = Field(100, ge=1)
    """Fewer rows than this is treated as a broken ingest."""
    num_classes: int = Field(10, ge=2)
    """Classes the reference distribution covers (labels 0..num_classes-1)."""
    class_balance_tolerance: float = Field(0.03, gt=0.0, le=1.0)
    """Largest allowed absolute gap between a class's share and its reference share.

    The reference is uniform over ``num_classes``; digits deviates from it by < 0.002."""


class DataConfig(_Strict):
    dataset: Literal["digits"] = "digits"
    """Source data set. ``digits``: the scikit-learn digits (1797 8x8 images, ships with scikit-learn)."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of rows held out for evaluation, stratified by label."""
    seed: int = 0
    """Seed of the train/test split and of training."""
    max_rows: int | None = Field(None, ge=10)
    """Take a stratified subset of this many rows (for quick runs); None: all rows."""
    validation: ValidationConfig = ValidationConfig()


class TrainingConfig(_Strict):
    model: str = "digits_cnn"
    """Registered architecture name."""
    workers: int = Field(2, ge=1, le=512)
    """Ray Train data-parallel workers."""
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1)
    """Per-worker batch size."""
    learning_rate: float = Field(2e-3, gt=0, le=10)
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = Field(1e-4, ge=0)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor arguments of the model (e.g. ``{channels: 16}``); stored in the bundle."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: data parallel, a full model replica per worker. ``fsdp``: parameters, gradients
    and optimizer state sharded over workers, for models that do not fit one device."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``bf16``: autocast on CPU and GPU (no loss scaling needed: bf16 has fp32's exponent range).
    ``fp16``: autocast plus a gradient scaler; GPU only."""
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    """Micro-batches per optimizer step; the effective batch is ``batch_size * grad_accum_steps * workers``."""
    grad_clip_norm: float | None = Field(None, gt=0)
    """Clip the global gradient L2 norm to this value before each optimizer step; None: no clipping."""
    lr_schedule: Literal["warmup_cosine", "constant"] = "warmup_cosine"
    warmup_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Share of all optimizer steps spent warming up linearly from ~0 to ``learning_rate``."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the cosine decay, as a fraction of ``learning_rate``."""
    validation_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    """Share of the training split held out (stratified, seeded) for per-epoch validation,
    early stopping and best-checkpoint selection. 0: use training loss instead."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many epochs without improvement of the monitored metric; None: never."""
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    """Smallest change of the monitored metric that counts as an improvement."""
    checkpoint_every_epochs: int = Field(1, ge=1)
    """Checkpoint interval in epochs; the last epoch is always checkpointed. On spot capacity
    an interruption loses at most this much work."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the best K checkpoints by the monitored metric (the latest is always kept too)."""
    max_failures: int = Field(2, ge=-1)
    """Worker-group failures to recover from (resuming from the latest checkpoint); -1: unlimited."""
    grad_compression: Literal["none", "fp16", "bf16", "powersgd"] = "none"
    """DDP communication hook compressing gradients on the wire (``ddp`` strategy only)."""
    profile: bool = False
    """Record a ``torch.profiler`` trace of a few steps of the first epoch (rank 0) into the run's artifacts."""
    target: Literal["local", "kuberay", "sagemaker"] = "local"
    """Where the pipeline's train stage and ``kubeml train`` train: Ray on this machine, a KubeRay
    ``RayJob``, or a SageMaker training job (an ACK ``TrainingJob``). The cluster targets create the
    job, wait for it and read its model bundle from the artifact store, which must then be ``s3://``
    (see ``kubeml.training.launchers``)."""
    launcher: dict[str, Any] = Field(default_factory=dict)
    """Options of the target's launcher (image, node group, instance type, spot, ...), validated
    by ``kubeml.training`` when a job is built; see the launcher's options class."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "precision fp16 needs use_gpu: true (gradient scaling is CUDA-only); use precision: bf16 on CPU"
            )
        if self.grad_compression != "none" and self.strategy != "ddp":
            raise ValueError("grad_compression applies to strategy ddp only; set grad_compression: none for fsdp")
        return self


class GateConfig(_Strict):
    min_accuracy: float = Field(0.95, ge=0.0, le=1.0)
    min_macro_f1: float = Field(0.94, ge=0.0, le=1.0)


#: Seconds one inference may take before it is answered 504. The digits CNN answers in
#: milliseconds; 30 s only trips on a stuck or badly overloaded server, and stays under
#: the 60 s idle timeouts of common load balancers, so the client sees our 504, not theirs.
DEFAULT_REQUEST_TIMEOUT_S = 30.0


class ServingConfig(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=1, le=65535)
    grpc_port: int = Field(8081, ge=1, le=65535)
    """Open Inference Protocol V2 gRPC port of the router ``kubeml deploy`` starts for a model;
    it splits and mirrors gRPC traffic between versions like REST traffic on ``http_port``."""
    target: Literal["local", "kserve"] = "local"
    """Where the deploy stage serves an approved version: model servers and the rollout
    router on this machine, or a KServe ``InferenceService`` on the cluster (see
    ``kubeml.serving.deploy``)."""
    smoke_samples: int = Field(64, ge=1)
    """Held-out samples sent to the new endpoint; its answers must equal offline evaluation's."""
    batch_max_size: int | None = Field(None, ge=1, strict=True)
    """Adaptive batching of the model servers ``kubeml deploy`` / ``kubeml run`` start: most
    instances per forward pass, summed over concurrent requests (``--batch-max-size``).
    Unset: batching off, one forward pass per request."""
    batch_max_latency_ms: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True)
    """Longest wait, in ms, of the oldest queued request before its batch runs
    (``--batch-max-latency-ms``; server default 5). Needs ``batch_max_size``."""
    request_timeout_s: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True)
    """Deadline of one inference on those servers, in seconds; a slower one is answered
    504 / ``DEADLINE_EXCEEDED`` (``--request-timeout-s``; 0: no limit; unset: the server
    default, 30 s)."""

    max_concurrency: int | None = Field(None, ge=0, strict=True)
    """Inference requests one model server works on at once; more are answered 503 with
    ``Retry-After`` instead of queueing (``--max-concurrency``; 0: no limit; unset: the
    server default, 64)."""
    auth_token_file: str | None = None
    """File of bearer tokens (one per line; a mounted Secret on a cluster) that inference on
    the model servers needs (``--auth-token-file``; re-read when it changes). Unset:
    inference is open to whoever reaches ``host``. The router passes the client's
    ``Authorization`` on to the servers, which check it."""
    header_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False, strict=True)
    """Seconds a client has to send a request's headers (``--header-timeout-s``; unset:
    the server default, 10 s): a slowloris client is cut off."""
    idle_timeout_s: int | None = Field(None, gt=0, strict=True)
    """Seconds a kept-alive connection may stay idle (``--idle-timeout-s``; unset: 65 s)."""

    @model_validator(mode="after")
    def _batching(self) -> ServingConfig:
        if self.batch_max_latency_ms is not None and self.batch_max_size is None:
            raise ValueError(
                "batch_max_latency_ms needs batch_max_size (which turns batching on); "
                "set batch_max_size or remove batch_max_latency_ms"
            )
        if self.batch_max_latency_ms is not None:
            timeout = DEFAULT_REQUEST_TIMEOUT_S if self.request_timeout_s is None else self.request_timeout_s
            if timeout and self.batch_max_latency_ms / 1000 >= timeout:
                raise ValueError(
                    f"batch_max_latency_ms {self.batch_max_latency_ms:g} is not below the request "
                    f"timeout of {timeout:g} s: requests would time out waiting for a batch; "
                    "lower batch_max_latency_ms or raise request_timeout_s"
                )
        return self

    def server_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ServingManager.deploy`` for the set batching/timeout keys."""
        keys = ("batch_max_size", "batch_max_latency_ms", "request_timeout_s", "max_concurrency",
                "auth_token_file", "header_timeout_s", "idle_timeout_s")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class SigningConfig(_Strict):
    """Ed25519 signing of approvals (see ``kubeml.approvals``); keys by reference only."""

    private_key: str | None = None
    """``file:PATH`` or ``env:NAME`` of the PEM private key ``kubeml models approve`` signs with
    (and the register stage, for versions an ``auto`` environment approves)."""
    public_key: str | None = None
    """``file:PATH`` or ``env:NAME`` of the PEM public key every deploy path verifies approvals
    with. Unset: approvals are not signature-checked (bundle digests always are)."""

    @field_validator("private_key", "public_key")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("file:") or v.startswith("env:")):
            raise ValueError("must be a reference, file:PATH or env:NAME, never the key itself")
        return v


_CPU = re.compile(r"^(\d+m|\d+(\.\d{1,3})?)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")


class TaskConfig(_Strict):
    """What one KFP task's pod gets: requests and limits, GPUs, and where it may run.

    Unset fields fall back to ``kubeflow.tasks.default``; a key set there and here takes
    this value. The limits default to the requests.
    """

    cpu: str | None = None
    """CPU request: cores (``2``, ``0.5``) or millicores (``500m``)."""
    cpu_limit: str | None = None
    memory: str | None = None
    """Memory request (``4Gi``, ``512Mi``)."""
    memory_limit: str | None = None
    gpu: int | None = Field(None, ge=0, le=16)
    """GPUs of ``gpu_type`` (a limit, as Kubernetes has for extended resources)."""
    gpu_type: str | None = None
    """The GPU resource name, ``nvidia.com/gpu`` by default."""
    node_selector: dict[str, str] | None = None
    """Node labels the pod must match (an EKS node group: ``eks.amazonaws.com/nodegroup``)."""
    tolerations: tuple[dict[str, str], ...] | None = None
    """Taints the pod tolerates: ``{key, operator: Equal|Exists, value, effect}``."""

    @field_validator("cpu", "cpu_limit")
    @classmethod
    def _cpu(cls, v: str | None) -> str | None:
        if v is not None and not _CPU.fullmatch(str(v)):
            raise ValueError("must be cores (2, 0.5) or millicores (500m)")
        return v

    @field_validator("memory", "memory_limit")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None and not _MEMORY.fullmatch(str(v)):
            raise ValueError("must be a memory quantity such as 4Gi or 512Mi")
        return v

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: tuple[dict[str, str], ...] | None) -> tuple[dict[str, str], ...] | None:
        for toleration in v or ():
            unknown = set(toleration) - {"key", "operator", "value", "effect"}
            if unknown:
                raise ValueError(f"unknown toleration keys {sorted(unknown)}; allowed: key, operator, value, effect")
            if toleration.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError("a toleration's operator is Equal or Exists")
            if toleration.get("effect") not in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise ValueError("a toleration's effect is NoSchedule, PreferNoSchedule or NoExecute")
        return v

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> TaskConfig:
        for request, limit, size in (("cpu", "cpu_limit", _cpu_cores), ("memory", "memory_limit", _memory_bytes)):
            low, high = getattr(self, request), getattr(self, limit)
            if low is not None and high is not None and size(high) < size(low):
                raise ValueError(f"{limit} {high} is below {request} {low}: a limit must be at least the request")
        return self

    def over(self, base: TaskConfig) -> TaskConfig:
        """This task's settings, with ``base``'s where this one leaves a field unset.

        A request set here without its limit takes no limit from ``base``: the limit is then
        the request, so a task asking for more than the default never gets the default's cap.
        """
        merged = {**base.model_dump(exclude_none=True), **self.model_dump(exclude_none=True)}
        for request, limit in (("cpu", "cpu_limit"), ("memory", "memory_limit")):
            if getattr(self, request) is not None and getattr(self, limit) is None:
                merged.pop(limit, None)
        return TaskConfig.model_validate(merged)


_MEMORY_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def _cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _memory_bytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity)
    assert match is not None  # the field validator has checked the form
    return float(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def _default_tasks() -> dict[str, TaskConfig]:
    # A step that only waits (a KubeRay or SageMaker job, a KServe rollout) needs little; a
    # step that trains or evaluates in its own pod (training.target: local) needs more.
    small = TaskConfig(cpu="500m", cpu_limit="2", memory="1Gi", memory_limit="4Gi")
    return {"default": small, "train": TaskConfig(cpu="2", cpu_limit="4", memory="8Gi", memory_limit="16Gi"),
            "evaluate": TaskConfig(cpu="1", memory="4Gi", memory_limit="8Gi")}


class KubeflowConfig(_Strict):
    """Where ``kubeml run --target kubeflow`` submits the pipeline: a Kubeflow Pipelines v2 API.

    Secrets are given by reference, ``env:NAME`` or ``file:PATH``, never inline: the file is
    often committed, and the value is read only when a run is submitted.
    """

    host: str | None = None
    """Base URL of the KFP API: the Kubeflow gateway's pipeline path
    (``https://kubeflow.example.com/pipeline``) or a port-forward (``http://127.0.0.1:8888``).
    None: the in-cluster service (``http://ml-pipeline.kubeflow.svc.cluster.local:8888``), for
    a submitter running in a pod with ``auth: service-account``."""
    namespace: str | None = None
    """The Kubeflow profile namespace runs and experiments belong to (multi-user Kubeflow).
    None: a single-user install, which has no namespaces."""
    experiment: str = Field("kubeml", min_length=1, max_length=128)
    """The experiment runs are filed under. It must exist, unless ``create_experiment``."""
    create_experiment: bool = False
    """Create ``experiment`` when it does not exist. Off by default: a mistyped name is an
    error that lists the experiments there are, not a new experiment."""
    auth: Literal["none", "token", "cookie", "service-account"] = "none"
    """``token``: a bearer token (``Authorization: Bearer``), e.g. from the gateway's OIDC
    provider; ``cookie``: Kubeflow's OIDC session cookie from a browser login
    (``authservice_session=...`` or oauth2-proxy's ``_oauth2_proxy=...``);
    ``service-account``: the pod's projected service-account token for the
    ``pipelines.kubeflow.org`` audience, refreshed on every call; ``none``: no credentials
    (a port-forward to a single-user install)."""
    token: str | None = None
    """``auth: token``: ``env:NAME`` or ``file:PATH`` of the bearer token."""
    cookie: str | None = None
    """``auth: cookie``: ``env:NAME`` or ``file:PATH`` of the cookie, ``NAME=VALUE``."""
    service_account_token_path: str = "/var/run/secrets/kfp/token"
    """``auth: service-account``: where the projected token is mounted (KFP's convention)."""
    pipeline_root: str | None = None
    """Where KFP writes the steps' artifacts: an object store the cluster writes
    (``s3://``, ``gs://``, ``minio://``). None: ``<artifact_store.uri>/pipeline-root`` when
    the artifact store is ``s3://``; a local store has no root a cluster could write."""
    service_account: str | None = None
    """Kubernetes service account of the run's pods (its IRSA role gives them S3); None:
    the profile's ``default-editor``."""
    ui_host: str | None = None
    """Base URL of the Kubeflow Pipelines UI for run links; None: ``host``."""
    ca_cert: str | None = None
    """PEM file of the CA that signs the host's certificate; None: the system's."""
    verify_tls: bool = True
    poll_s: float = Field(5.0, gt=0, le=600)
    """Seconds between two reads of a followed run."""
    timeout_s: float = Field(7 * 24 * 3600.0, gt=0)
    """Seconds to follow a run before giving up (the run keeps going)."""
    request_timeout_s: float = Field(30.0, gt=0, le=600)
    """Seconds one API call may take."""
    tasks: dict[Literal["default", "configure", "ingest", "validate", "train", "evaluate", "gate", "register",
                        "deploy"], TaskConfig] = Field(default_factory=_default_tasks)
    """Resources and placement of each step's pod, by stage name; ``default`` for all of them.
    Given in kubeml.yaml, the whole mapping replaces these defaults."""

    def task(self, stage: str) -> TaskConfig:
        """The settings of ``stage``'s pod: its own over ``default``."""
        base = self.tasks.get("default", TaskConfig())
        return self.tasks[stage].over(base) if stage in self.tasks else base

    @field_validator("host", "ui_host")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", v):
            raise ValueError("must be an http:// or https:// URL, like https://kubeflow.example.com/pipeline")
        return v.rstrip("/") if v else v

    @field_validator("token", "cookie")
    @classmethod
    def _secret_reference(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("file:") or v.startswith("env:")):
            raise ValueError("must be a reference, file:PATH or env:NAME, never the secret itself")
        return v

    @model_validator(mode="after")
    def _auth_has_its_secret(self) -> KubeflowConfig:
        for auth, key in (("token", "token"), ("cookie", "cookie")):
            if self.auth == auth and getattr(self, key) is None:
                raise ValueError(f"auth: {auth} needs {key}: (env:NAME or file:PATH)")
        for stage in self.tasks:
            try:
                self.task(stage)
            except ValidationError as exc:
                raise ValueError(f"tasks.{stage} over tasks.default: {exc.errors()[0]['msg']}") from None
        return self


class EnvironmentConfig(_Strict):
    name: Literal["dev", "staging", "prod"] = "dev"
    approval: Literal["auto", "manual"] = "auto"
    """``auto``: new versions are approved on registration; ``manual``: they wait for ``kubeml models approve``."""
    home: str = DEFAULT_HOME
    """Local state directory (server state, caches)."""
    artifact_store: ArtifactStoreConfig = ArtifactStoreConfig()
    registry: RegistryConfig = RegistryConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    signing: SigningConfig = SigningConfig()
    kubeflow: KubeflowConfig = KubeflowConfig()

    def resolved(self, base: str | Path) -> EnvironmentConfig:
        """Return a copy with relative local paths made absolute against ``base``.

        Stages run in other processes and other working directories (kfp.local, Ray
        workers); they must see the same paths the user meant.
        """
        base = Path(base).resolve()
        home = str((base / self.home).resolve())
        store = self.artifact_store
        if store.uri.startswith("file://"):
            p = store.uri[len("file://") :]
            store = store.model_copy(update={"uri": "file://" + str((base / p).resolve())})
        reg = self.registry
        if reg.tracking_uri.startswith("sqlite:///") and not reg.tracking_uri.startswith("sqlite:////"):
            p = reg.tracking_uri[len("sqlite:///") :]
            reg = reg.model_copy(update={"tracking_uri": "sqlite:///" + str((base / p).resolve())})
        return self.model_copy(update={"home": home, "artifact_store": store, "registry": reg})


class KubemlConfig(_Strict):
    project: str = Field("kubeml", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    environments: dict[Literal["dev", "staging", "prod"], dict[str, Any]] = Field(default_factory=dict)

    def environment(self, name: str, base: str | Path = ".") -> EnvironmentConfig:
        if name not in ENVIRONMENTS:
            raise ConfigError(f"unknown environment {name!r}; allowed values: {', '.join(ENVIRONMENTS)}")
        raw = dict(self.environments.get(name) or {})
        raw.setdefault("name", name)
        if name != "dev":
            # Only dev trusts a fresh model without a human: staging and prod wait for approval.
            raw.setdefault("approval", "manual")
        try:
            env = EnvironmentConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, prefix=f"environments.{name}", model=EnvironmentConfig)) from None
        return env.resolved(base)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by walking ``loc`` down from ``model``."""
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return sorted(model.model_fields)


def _explain(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "[key]")
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, tuple(err["loc"][:-1])) if model else []
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{key}: unknown key{hint}")
        elif err["type"] == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            lines.append(f"{key}: {err['input']!r} is not allowed; allowed values: {allowed}")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(f"  - {line}" for line in lines)


def load_config(path: str | Path | None = None, environment: str | None = None) -> EnvironmentConfig:
    """Load and validate ``kubeml.yaml`` and return one environment, paths resolved.

    With no file (``path`` None and no ``kubeml.yaml`` in the working directory) the
    embedded defaults are used: everything local under ``.kubeml/``.
    ``environment`` defaults to ``$KUBEML_ENV`` or ``dev``.
    """
    environment = environment or os.environ.get("KUBEML_ENV") or "dev"
    if path is None:
        candidate = Path("kubeml.yaml")
        path = candidate if candidate.is_file() else None
    if path is None:
        return KubemlConfig().environment(environment, base=Path.cwd())
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with 'environments'")
    try:
        cfg = KubemlConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + _explain(exc, model=KubemlConfig)) from None
    base = path.resolve().parent
    # Validate every environment, not only the selected one: a typo in prod must not
    # wait for the day someone deploys to prod.
    for name in cfg.environments:
        try:
            cfg.environment(name, base=base)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return cfg.environment(environment, base=base)
