"""SageMaker launcher for P4d: the SageMaker SDK configuration and the equivalent ACK ``TrainingJob``.

Both describe one job: ``ml.p4d.24xlarge`` instances (8 A100 40 GB each) running
``python -m kubeml.training.ray_main`` in a kubeml training image. On each instance Ray
Train starts one worker per GPU and trains with torch distributed (NCCL over EFA); a
multi-instance job joins the instances into one process group the same way. Managed spot
training saves up to ~70 % of the on-demand price; SageMaker syncs ``/opt/ml/checkpoints`` to
``checkpoint_s3_uri`` and restores it on the replacement instance, and kubeml keeps its
checkpoints in the S3 artifact store anyway, so an interrupted job resumes from the last one.

- :func:`model_trainer` builds a ``sagemaker.train.ModelTrainer`` (SDK v3): call ``.train()``
  with AWS credentials to start the job.
- :func:`training_job_manifest` builds the ACK ``TrainingJob`` (``sagemaker.services.k8s.aws/v1alpha1``)
  for clusters running the ACK SageMaker controller; the KFP step (or ``kubeml train
  --target sagemaker``) creates it and follows its status with
  :func:`kubeml.training.launchers._jobs.run_job`.
- :class:`SageMakerLauncher` is the launcher of ``training.target: sagemaker`` (the ACK path).

The job writes the model bundle to ``models/RUN_ID/bundle`` in the S3 artifact store of
``KUBEML_CONFIG`` (the contract is in :mod:`kubeml.training.launchers._contract`), not only to
SageMaker's ``/opt/ml/model``: the pipeline's evaluate and register steps read it there.

No AWS call is made here. (Tests validate the SDK objects locally and the manifest against
the real CRD schema on the test control plane; a real AWS account is the one stand-in.)
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubeml.config import EnvironmentConfig, TrainingConfig
from kubeml.errors import ConfigError
from kubeml.training.launchers._cluster import ClusterLauncher

__all__ = ["SageMakerLauncher", "SageMakerOptions", "model_trainer", "training_job_manifest"]

#: GPUs per instance type, for the Ray worker count (one worker per GPU).
GPUS = {"ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8, "ml.p5.48xlarge": 8, "ml.g5.xlarge": 1, "ml.g5.12xlarge": 4}


class SageMakerOptions(BaseModel):
    """``training.launcher`` keys for ``target: sagemaker``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role_arn: str = Field("arn:aws:iam::123456789012:role/kubeml-sagemaker", pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$")
    """Execution role SageMaker assumes (S3 access to the artifact bucket, ECR pull)."""
    image: str = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-gpu-py311"
    """Training image; it must have kubeml installed (build FROM the AWS PyTorch DLC)."""
    instance_type: str = "ml.p4d.24xlarge"
    instance_count: int = Field(1, ge=1, le=64)
    volume_size_gb: int = Field(200, ge=1)
    spot: bool = True
    """Managed spot training; needs ``max_wait_s`` >= ``max_run_s``."""
    max_run_s: int = Field(86_400, ge=60, le=28 * 86_400)
    """Longest the job may train (SageMaker's MaxRuntimeInSeconds; 28 days is its limit)."""
    max_wait_s: int | None = Field(172_800, ge=60)
    """Longest to wait for spot capacity plus training time (MaxWaitTimeInSeconds)."""
    checkpoint_local_path: str = "/opt/ml/checkpoints"
    namespace: str = "kubeml"
    """Namespace of the ACK TrainingJob."""
    job_name_prefix: str = "kubeml"
    wait_timeout_s: float | None = Field(None, gt=0)
    """Seconds the train step (or ``kubeml train``) waits for the job before giving up (the job
    keeps running; a retried step adopts it). None: the job's own limit (``max_wait_s`` with
    spot, else ``max_run_s``) plus an hour for provisioning and the model upload."""
    poll_s: float = Field(30.0, gt=0)
    """Seconds between two status reads of the TrainingJob (ACK itself syncs with AWS about once a minute)."""

    @property
    def effective_wait_timeout_s(self) -> float:
        if self.wait_timeout_s is not None:
            return self.wait_timeout_s
        return float((self.max_wait_s if self.spot and self.max_wait_s else self.max_run_s) + 3600)

    @model_validator(mode="after")
    def _spot(self) -> SageMakerOptions:
        if self.spot and (self.max_wait_s is None or self.max_wait_s < self.max_run_s):
            raise ValueError("managed spot training needs max_wait_s >= max_run_s (waiting time includes training time)")
        if not self.spot and self.max_wait_s is not None:
            object.__setattr__(self, "max_wait_s", None)  # MaxWaitTimeInSeconds is rejected without spot
        return self

    @classmethod
    def from_training(cls, tc: TrainingConfig) -> SageMakerOptions:
        try:
            return cls.model_validate(tc.launcher)
        except ValidationError as exc:
            problems = "; ".join(f"training.launcher{'.' if e['loc'] else ''}{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors())
            raise ConfigError(f"invalid SageMaker launcher options: {problems}") from None


def _job_name(prefix: str, run_id: str) -> str:
    # SageMaker job names: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}.
    name = re.sub(r"[^a-zA-Z0-9-]", "-", f"{prefix}-{run_id}")
    return re.sub(r"-+", "-", name)[:63].strip("-")


def _job_env(cfg: EnvironmentConfig, opts: SageMakerOptions, run_id: str, dataset: str, dataset_version: str,
             resume: bool = False) -> dict[str, str]:
    if not cfg.artifact_store.uri.startswith("s3://"):
        raise ConfigError("SageMaker jobs read data and write checkpoints in S3: set artifact_store.uri to s3://...")
    gpus = GPUS.get(opts.instance_type, 1)
    # One Ray worker per GPU across all instances.
    training = cfg.training.model_copy(update={"target": "local", "use_gpu": True,
                                                "workers": gpus * opts.instance_count})
    job_cfg = cfg.model_copy(update={"training": training})
    env = {
        "KUBEML_CONFIG": job_cfg.model_dump_json(),
        "KUBEML_RUN_ID": run_id,
        "KUBEML_DATASET": dataset,
        "KUBEML_DATASET_VERSION": dataset_version,
        # NCCL over EFA on p4d: libfabric's EFA provider, GPUDirect RDMA.
        "FI_PROVIDER": "efa",
        "FI_EFA_USE_DEVICE_RDMA": "1",
        "NCCL_DEBUG": "WARN",
    }
    if resume:
        env["KUBEML_RESUME"] = "1"
    return env


def _s3(cfg: EnvironmentConfig, *parts: str) -> str:
    return "/".join([cfg.artifact_store.uri.rstrip("/"), *parts])


def training_job_manifest(
    cfg: EnvironmentConfig,
    *,
    run_id: str,
    dataset: str,
    dataset_version: str,
    options: SageMakerOptions | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """The ACK ``TrainingJob`` for this run (``resume``: require checkpoints to continue from)."""
    opts = options or SageMakerOptions.from_training(cfg.training)
    name = _job_name(opts.job_name_prefix, run_id)
    stopping: dict[str, int] = {"maxRuntimeInSeconds": opts.max_run_s}
    if opts.spot and opts.max_wait_s:
        stopping["maxWaitTimeInSeconds"] = opts.max_wait_s
    return {
        "apiVersion": "sagemaker.services.k8s.aws/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name.lower()[:63], "namespace": opts.namespace,
                     "labels": {"app.kubernetes.io/name": "kubeml", "app.kubernetes.io/component": "training"},
                     # The launcher adopts an existing TrainingJob of this name only for the same run.
                     "annotations": {"kubeml.io/run-id": run_id}},
        "spec": {
            "trainingJobName": name,
            "roleARN": opts.role_arn,
            "algorithmSpecification": {"trainingImage": opts.image, "trainingInputMode": "File"},
            "outputDataConfig": {"s3OutputPath": _s3(cfg, "sagemaker", "output")},
            "resourceConfig": {"instanceCount": opts.instance_count, "instanceType": opts.instance_type,
                               "volumeSizeInGB": opts.volume_size_gb},
            "stoppingCondition": stopping,
            "enableManagedSpotTraining": opts.spot,
            "checkpointConfig": {"s3URI": _s3(cfg, "sagemaker", "checkpoints", run_id),
                                 "localPath": opts.checkpoint_local_path},
            "environment": _job_env(cfg, opts, run_id, dataset, dataset_version, resume),
            "hyperParameters": {"sagemaker_program": "kubeml.training.ray_main"},
            # SageMaker restarts the job on an internal error up to this many times; it resumes from S3.
            "retryStrategy": {"maximumRetryAttempts": 2},
            "tags": [{"key": "kubeml.run_id", "value": run_id}],
        },
    }


def model_trainer(
    cfg: EnvironmentConfig,
    *,
    run_id: str,
    dataset: str,
    dataset_version: str,
    options: SageMakerOptions | None = None,
    sagemaker_session: Any | None = None,
) -> Any:
    """A ``sagemaker.train.ModelTrainer`` for this run; ``.train(wait=False)`` starts it (needs AWS)."""
    from sagemaker.core.shapes import CheckpointConfig, OutputDataConfig
    from sagemaker.core.training.configs import Compute, SourceCode, StoppingCondition
    from sagemaker.train.model_trainer import ModelTrainer

    opts = options or SageMakerOptions.from_training(cfg.training)
    try:
        return ModelTrainer(
            role=opts.role_arn,
            base_job_name=_job_name(opts.job_name_prefix, run_id)[:40],
            training_image=opts.image,
            source_code=SourceCode(command="python -m kubeml.training.ray_main"),
            compute=Compute(instance_type=opts.instance_type, instance_count=opts.instance_count,
                            volume_size_in_gb=opts.volume_size_gb, enable_managed_spot_training=opts.spot),
            stopping_condition=StoppingCondition(max_runtime_in_seconds=opts.max_run_s,
                                                 max_wait_time_in_seconds=opts.max_wait_s if opts.spot else None),
            checkpoint_config=CheckpointConfig(s3_uri=_s3(cfg, "sagemaker", "checkpoints", run_id),
                                               local_path=opts.checkpoint_local_path),
            output_data_config=OutputDataConfig(s3_output_path=_s3(cfg, "sagemaker", "output")),
            environment=_job_env(cfg, opts, run_id, dataset, dataset_version),
            sagemaker_session=sagemaker_session,
        )
    except ValidationError as exc:
        raise ConfigError(f"SageMaker rejected the training configuration: {exc}") from exc


class SageMakerLauncher(ClusterLauncher):
    """``training.target: sagemaker``: an ACK ``TrainingJob`` on the cluster, followed to the end."""

    name = "sagemaker"
    options_type = SageMakerOptions
    build = staticmethod(training_job_manifest)
