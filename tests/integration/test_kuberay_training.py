"""KubeRay for real: the train stage's RayJob trains in real Ray pods on the real node.

The KubeRay operator (built from the module of the CRDs' version) turns the RayJob into a
Ray cluster of real pods running the runtime image (``images/runtime.Containerfile``, built
by ``make images``). The head runs the job's entrypoint, the same ``fit`` as a local run;
two worker pods train. Checkpoints, the result record and the bundle go to the S3 API,
moto's server here (the one stand-in: S3 is an AWS service), which the pods reach through
the node's address (:meth:`RealNode.host_service`). Pods run under Pod Security
``restricted`` in their namespace, with the S3 credentials from a Secret.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi

from kubeml.config import KubemlConfig
from kubeml.testing.cluster import REAL_NODE_TAINT
from kubeml.testing.cluster.fixtures import temporary_namespace, wait_until
from kubeml.training.launchers.kuberay import rayjob_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

TOLERATION = {"key": REAL_NODE_TAINT.key, "operator": "Equal", "value": REAL_NODE_TAINT.value,
              "effect": REAL_NODE_TAINT.effect}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def pod_s3(real_cluster, s3_endpoint: str) -> Iterator[str]:
    """The S3 endpoint as the pods reach it: a relay on the node's address."""
    port = int(s3_endpoint.rsplit(":", 1)[1])
    with real_cluster.node.host_service(port, what="the S3 API (moto)") as address:
        yield f"http://{address}"


@pytest.fixture(scope="module")
def core(real_cluster) -> Iterator[CoreV1Api]:
    with real_cluster.api_client() as client:
        yield CoreV1Api(client)


@pytest.fixture
def ns(real_cluster, core: CoreV1Api) -> Iterator[str]:
    """A namespace like a tenant's: Pod Security ``restricted``, a training service account,
    and the S3 credentials as a Secret (IRSA's part on EKS)."""
    with real_cluster.api_client() as client, temporary_namespace(
        client, prefix="train", labels={"pod-security.kubernetes.io/enforce": "restricted"}
    ) as name:
        core.create_namespaced_service_account(name, {"metadata": {"name": "kubeml-train"},
                                                      "automountServiceAccountToken": False})
        core.create_namespaced_secret(name, {"metadata": {"name": "s3-credentials"}, "stringData": CREDENTIALS})
        yield name


def _env(ns: str, bucket: str, s3_endpoint: str, pod_s3: str, tmp_path, **training: Any) -> dict[str, Any]:
    launcher = {
        "namespace": ns, "node_group": "local", "head_node_group": "local",
        "tolerations": [TOLERATION], "head_tolerations": [TOLERATION],
        # Requests that fit a 2-core node. The head may use the node's CPU, or its start (30 s
        # for the raylet to register) times out under throttling and the Ray pods restart.
        # Workers stay at their request: at full speed the 12 epochs end before the deleted
        # worker is noticed, and there is nothing to recover.
        "gpus_per_worker": 0, "cpus_per_worker": "600m", "memory_per_worker": "3Gi",
        "head_cpu": "400m", "head_cpu_limit": "2", "head_memory": "3Gi",
        "submitter_cpu": "200m", "submitter_cpu_limit": "1", "submitter_memory": "512Mi",
        "shm_size": "256Mi", "env_secret": "s3-credentials", "artifact_endpoint_url": pod_s3,
        "poll_s": 1, "wait_timeout_s": 1200, "stall_timeout_s": 600, "image_grace_s": 60,
        "ttl_seconds_after_finished": 60,
    }
    launcher.update(training.pop("launcher", {}))
    return {"artifact_store": {"uri": f"s3://{bucket}/kubeml", "endpoint_url": s3_endpoint},
            "home": str(tmp_path / "home"),
            "training": {"target": "kuberay", "workers": 2, "epochs": 12, "launcher": launcher, **training}}


class _WorkerKiller(threading.Thread):
    """Deletes one Ray worker pod once the run's first checkpoint is in the store."""

    def __init__(self, core: CoreV1Api, ns: str, store: Any, run_id: str):
        super().__init__(daemon=True)
        self.core, self.ns, self.store, self.run_id = core, ns, store, run_id
        self.deleted: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 1100
            while not self.done.is_set() and time.monotonic() < deadline:
                if any(k.endswith("/state.json") or "epoch-" in k for k in self.store.list(f"checkpoints/{self.run_id}/")):
                    workers = self.core.list_namespaced_pod(
                        self.ns, label_selector="ray.io/node-type=worker").items
                    running = [p for p in workers if p.status.phase == "Running"]
                    if running:
                        victim = running[0].metadata.name
                        self.core.delete_namespaced_pod(victim, self.ns, grace_period_seconds=0)
                        self.deleted = victim
                        return
                time.sleep(0.5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.timeout(2400)
def test_rayjob_trains_in_real_pods_recovers_a_deleted_worker_and_its_bundle_scores(
        real_cluster, runtime_image, pod_s3, core, ns, bucket, s3_endpoint, tmp_path, monkeypatch):
    from kubeml.artifacts import open_store
    from kubeml.ledger import Ledger
    from kubeml.pipelines.stages import evaluate_stage, ingest_stage, train_stage

    monkeypatch.setenv("KUBECONFIG", str(real_cluster.admin_kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = KubemlConfig(environments={"staging": _env(ns, bucket, s3_endpoint, pod_s3, tmp_path)}).environment("staging")
    config_json = cfg.model_dump_json()
    run_id = "real-1"
    store = open_store(cfg.artifact_store.uri, endpoint_url=s3_endpoint)
    dataset, version = ingest_stage(config_json, run_id)

    killer = _WorkerKiller(core, ns, store, run_id)
    killer.start()
    try:
        bundle_key = train_stage(config_json, run_id, dataset, version)
    finally:
        killer.done.set()
        killer.join(timeout=10)
    assert killer.error is None, killer.error
    assert killer.deleted, "no worker pod was running once the first checkpoint was written"

    train = Ledger(store, run_id).read("train")
    assert train.status == "succeeded" and train.outputs["target"] == "kuberay"
    job = train.outputs["job"]
    assert job["kind"] == "RayJob" and job["status"] == "Complete / SUCCEEDED", job
    # The job really ran in the Ray cluster (each line is the status with its message).
    assert any(line.startswith("Running / RUNNING") for line in job["transitions"]), job["transitions"]
    # The lost worker cost a restart of the worker group, from the checkpoint, not from zero.
    attempts = train.outputs["attempts"]
    assert len(attempts) >= 2, attempts
    assert attempts[-1]["start_epoch"] >= 1, attempts
    assert train.outputs["epochs"] == 12 and len(train.outputs["history"]) == 12
    assert train.outputs["bundle_uri"] == f"s3://{bucket}/kubeml/models/{run_id}/bundle"

    accuracy, macro_f1 = evaluate_stage(config_json, run_id, dataset, version, bundle_key)
    assert accuracy >= 0.97 and macro_f1 >= 0.96, (accuracy, macro_f1)

    # The Ray cluster went with the finished job (shutdownAfterJobFinishes); its pods ran here.
    wait_until(lambda: not core.list_namespaced_pod(ns, label_selector="ray.io/is-ray-node=yes").items,
               timeout_s=120, what="the Ray pods removed after the job finished")


@pytest.mark.timeout(1200)
def test_a_failing_job_reports_its_traceback_and_deleting_it_removes_its_pods(
        real_cluster, runtime_image, pod_s3, core, ns, bucket, s3_endpoint, tmp_path):
    """A dataset version that is not in the store: the job's driver fails in the pod, and
    the error the user gets quotes the end of the job's own log."""
    from kubeml.errors import JobFailed
    from kubeml.training.launchers import run_job
    from kubeml.training.launchers.kuberay import KubeRayOptions, rayjob_manifest

    cfg = KubemlConfig(environments={"staging": _env(
        ns, bucket, s3_endpoint, pod_s3, tmp_path, workers=1, launcher={"backoff_limit": 0})}).environment("staging")
    opts = KubeRayOptions.from_training(cfg.training)
    manifest = rayjob_manifest(cfg, run_id="broken-1", dataset="digits", dataset_version="no-such-version",
                               options=opts)
    with real_cluster.api_client() as client:
        with pytest.raises(JobFailed) as info:
            run_job(manifest, namespace=ns, poll_s=1, stall_s=600, image_grace_s=60, timeout_s=900,
                    api_client=client)
        message = str(info.value)
        assert f"RayJob {ns}/{rayjob_name('broken-1')} ended Failed" in message, message
        assert "--- the end of its log" in message and "no-such-version" in message.split("--- the end")[1], message
        CustomObjectsApi(client).delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs",
                                                                 manifest["metadata"]["name"])
    wait_until(lambda: not core.list_namespaced_pod(ns, label_selector="ray.io/is-ray-node=yes").items,
               timeout_s=120, what="the Ray pods removed with their RayJob")


@pytest.mark.timeout(900)
def test_kubeml_train_submits_a_rayjob_and_sigterm_deletes_it_with_its_pods(
        real_cluster, runtime_image, pod_s3, core, ns, bucket, s3_endpoint, tmp_path):
    """``kubeml train --target kuberay`` as a user (or a CI job) runs it: the RayJob is
    created in the tenant namespace and followed; SIGTERM (a stopped CI job, a terminated
    step pod) deletes the job, and its Ray pods go with it."""
    import os
    import signal
    import sys

    import yaml

    config = tmp_path / "kubeml.yaml"
    config.write_text(yaml.safe_dump({"environments": {"staging": _env(ns, bucket, s3_endpoint, pod_s3, tmp_path)}}))
    run_id = "cli-cancel-1"
    env = {**os.environ, "KUBECONFIG": str(real_cluster.admin_kubeconfig), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [sys.executable, "-m", "kubeml.cli", "train", "--config", str(config), "--env", "staging",
           "--target", "kuberay", "--run-id", run_id]
    name = rayjob_name(run_id)
    with real_cluster.api_client() as client, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) as proc:
        objects = CustomObjectsApi(client)
        try:
            # Its Ray cluster is being made: the head pod exists.
            wait_until(lambda: proc.poll() is not None
                       or bool(core.list_namespaced_pod(ns, label_selector="ray.io/node-type=head").items),
                       timeout_s=300, what="the RayJob's head pod")
            assert proc.poll() is None, f"kubeml train ended early ({proc.returncode}):\n{proc.communicate()}"
            job = objects.get_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", name)
            assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] \
                == runtime_image
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, (proc.returncode, out, err)
        assert f"RayJob {ns}/{name}" in out, out
        assert "cancelled" in err and "the job was deleted" in err, err

        def gone() -> bool:
            names = [o["metadata"]["name"] for o in
                     objects.list_namespaced_custom_object("ray.io", "v1", ns, "rayjobs")["items"]]
            return name not in names

        wait_until(gone, timeout_s=60, what=f"RayJob {name} deleted")
    wait_until(lambda: not core.list_namespaced_pod(ns, label_selector="ray.io/is-ray-node=yes").items,
               timeout_s=120, what="the Ray pods removed with their cancelled RayJob")
