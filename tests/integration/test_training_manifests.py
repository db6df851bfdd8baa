"""RayJob and ACK TrainingJob manifests built by the launchers pass the apiserver's CRD schemas."""

from __future__ import annotations

import pytest

from kubeml.config import KubemlConfig
from kubeml.training.launch_kuberay import rayjob_manifest, server_dry_run, submit_and_follow
from kubeml.training.launch_sagemaker import training_job_manifest

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


def test_submit_follows_the_rayjob_status_until_it_completes(admin, namespace):
    from kubernetes.client import CustomObjectsApi

    job = rayjob_manifest(_cfg(workers=1, launcher={"namespace": namespace, "gpus_per_worker": 0}),
                          run_id="follow", dataset="digits", dataset_version="v-1")
    api = CustomObjectsApi(admin)
    seen: list[str] = []

    def on_status(text: str) -> None:
        seen.append(text)
        # The test plays the KubeRay operator (none runs on the test control plane): it
        # writes the status subresource the way the operator does when the job finishes.
        if len(seen) == 1:
            api.patch_namespaced_custom_object_status(
                "ray.io", "v1", namespace, "rayjobs", job["metadata"]["name"],
                {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})

    final = submit_and_follow(job, namespace=namespace, api_client=admin, poll_s=0.2, timeout_s=60, on_status=on_status)

    assert seen[0] == "Pending" and final == "Complete / SUCCEEDED"
