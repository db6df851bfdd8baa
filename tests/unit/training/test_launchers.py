"""Launchers: RayJob and ACK TrainingJob manifests, the SageMaker SDK configuration, the entry point."""

from __future__ import annotations

import json

import pytest

from kubeml.config import KubemlConfig
from kubeml.errors import ConfigError
from kubeml.training.launchers.kuberay import KubeRayOptions, rayjob_manifest
from kubeml.training.launchers.sagemaker import SageMakerOptions, model_trainer, training_job_manifest
from kubeml.training.ray_main import main


def _cfg(store="s3://ml-artifacts/kubeml", **training):
    return KubemlConfig(environments={"prod": {"artifact_store": {"uri": store}, "training": training}}).environment("prod")


def test_rayjob_puts_gpu_workers_on_the_p4d_node_group_with_efa_and_spot():
    cfg = _cfg(workers=4, use_gpu=True, precision="bf16",
               launcher={"node_group": "gpu-p4d", "gpus_per_worker": 8, "efa_per_worker": 4, "spot": True})
    job = rayjob_manifest(cfg, run_id="Run_42", dataset="digits", dataset_version="v-abc")

    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "kubeml-run-42"
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"eks.amazonaws.com/nodegroup": "gpu-p4d", "eks.amazonaws.com/capacityType": "SPOT"}
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and limits["vpc.amazonaws.com/efa"] == "4"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = json.loads(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["KUBEML_RUN_ID"] == "Run_42" and env["KUBEML_DATASET_VERSION"] == "v-abc"
    assert json.loads(env["KUBEML_CONFIG"])["artifact_store"]["uri"] == "s3://ml-artifacts/kubeml"


def test_spot_without_s3_checkpoints_is_refused():
    with pytest.raises(ConfigError, match="s3://"):
        rayjob_manifest(_cfg(store="file:///tmp/a", launcher={"spot": True}), run_id="r", dataset="d", dataset_version="v")


def test_unknown_launcher_key_names_the_allowed_keys():
    with pytest.raises(ConfigError, match="training.launcher.gpu.*allowed keys: .*gpus_per_worker"):
        KubeRayOptions.from_training(_cfg(launcher={"gpu": 1}).training)


def test_training_job_uses_managed_spot_with_s3_checkpoints_on_p4d():
    job = training_job_manifest(_cfg(use_gpu=True), run_id="r1", dataset="digits", dataset_version="v-1")
    spec = job["spec"]
    assert spec["resourceConfig"]["instanceType"] == "ml.p4d.24xlarge"
    assert spec["enableManagedSpotTraining"] is True
    assert spec["stoppingCondition"]["maxWaitTimeInSeconds"] >= spec["stoppingCondition"]["maxRuntimeInSeconds"]
    assert spec["checkpointConfig"]["s3URI"] == "s3://ml-artifacts/kubeml/sagemaker/checkpoints/r1"
    assert json.loads(spec["environment"]["KUBEML_CONFIG"])["training"]["workers"] == 8  # one per A100


def test_spot_wait_shorter_than_run_is_refused():
    with pytest.raises(ConfigError, match="max_wait_s >= max_run_s"):
        SageMakerOptions.from_training(_cfg(launcher={"max_run_s": 7200, "max_wait_s": 3600}).training)


def test_sagemaker_sdk_configuration_validates(monkeypatch):
    # No AWS account here: dummy credentials, and the SDK's IAM role check (an AWS call) is off.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    trainer = model_trainer(_cfg(use_gpu=True), run_id="r1", dataset="digits", dataset_version="v-1")
    assert trainer.compute.instance_type == "ml.p4d.24xlarge"
    assert trainer.compute.enable_managed_spot_training is True
    assert trainer.stopping_condition.max_wait_time_in_seconds == 172_800
    assert trainer.checkpoint_config.s3_uri.endswith("/sagemaker/checkpoints/r1")


def test_entry_point_reports_missing_environment(capsys):
    assert main({}) == 2
    assert "KUBEML_CONFIG" in capsys.readouterr().err
