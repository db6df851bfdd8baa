"""RayJob and ACK TrainingJob manifests built by the launchers pass the apiserver's CRD schemas."""

from __future__ import annotations

import pytest

from kubeml.config import KubemlConfig
from kubeml.training.launchers import server_dry_run
from kubeml.training.launchers.kuberay import rayjob_manifest
from kubeml.training.launchers.sagemaker import training_job_manifest

pytestmark = pytest.mark.integration


def _cfg(**training):
    return KubemlConfig(environments={"prod": {"artifact_store": {"uri": "s3://ml-artifacts/kubeml"},
                                               "training": training}}).environment("prod")


def test_p4d_spot_rayjob_passes_server_side_dry_run(admin, namespace):
    cfg = _cfg(workers=2, use_gpu=True, precision="bf16",
               launcher={"namespace": namespace, "gpus_per_worker": 8, "efa_per_worker": 4, "spot": True})
    job = rayjob_manifest(cfg, run_id="dry-run", dataset="digits", dataset_version="v-1")

    created = server_dry_run(job, namespace=namespace, api_client=admin)

    assert created["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelector"] == \
        job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelector"]


def test_ack_training_job_passes_server_side_dry_run(admin, namespace):
    job = training_job_manifest(_cfg(use_gpu=True, launcher={"namespace": namespace}),
                                run_id="dry-run", dataset="digits", dataset_version="v-1")

    created = server_dry_run(job, namespace=namespace, api_client=admin)

    assert created["spec"] == job["spec"]  # nothing pruned: every field is in the schema

