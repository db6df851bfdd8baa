"""Submit-and-wait for cluster training jobs: the launcher's state machine, on the real
control plane of the shared (kwok) test cluster.

The real KubeRay operator runs only beside the real node, where
``tests/integration/test_kuberay_training.py`` trains in real Ray pods, fails a job for
real and deletes one. Here no controller runs, so :class:`ControllerStandIn` writes the
RayJob status subresource through transitions that a real operator reaches only by chance or
after minutes (a retried attempt, a job adopted on a 409, a timeout, a cancel mid-run), to
test the launcher's answer to each. The ACK SageMaker controller cannot run here at all (it
needs an AWS account), so the TrainingJob tests are stand-in only. Everything else is real:
the objects are created for real (the apiserver validates them against the CRD schemas
generated from the upstream Go types), the waiter reads them over HTTP, deletes them on
cancel and adopts them on retry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client import CustomObjectsApi, RbacAuthorizationV1Api
from kubernetes.client.exceptions import ApiException

from kubeml.testing.cluster.fixtures import wait_until
from kubeml.config import KubemlConfig
from kubeml.errors import JobCancelled, JobConflict, JobFailed, JobTimedOut
from kubeml.training.launchers import RBAC_RULES, run_job
from kubeml.training.launchers.kuberay import rayjob_manifest
from kubeml.training.launchers.sagemaker import training_job_manifest

pytestmark = pytest.mark.integration

RAY = ("ray.io", "v1", "rayjobs")
ACK = ("sagemaker.services.k8s.aws", "v1alpha1", "trainingjobs")


class ControllerStandIn(threading.Thread):
    """Plays the KubeRay operator's transitions that a real one reaches only rarely (see the
    module docstring), and the ACK SageMaker controller, which cannot run here at all.

    Watches (a real watch on the apiserver) for the object named ``name``; once it exists,
    runs ``act(api)`` (a list of status patches, or a callable doing whatever the controller
    would). With ``seen`` given, it waits after each patch until the waiter has reported a
    line starting with the patch's expected text, so that no transition is overwritten
    before the waiter could read it.
    """

    def __init__(self, cluster, namespace: str, resource: tuple[str, str, str], name: str, *,
                 steps: list[tuple[dict[str, Any], str]] | None = None,
                 act: Callable[[CustomObjectsApi], None] | None = None, seen: list[str] | None = None):
        super().__init__(daemon=True)
        self.cluster, self.namespace, self.resource, self.name = cluster, namespace, resource, name
        self.steps, self.act, self.seen = steps or [], act, seen
        self.error: BaseException | None = None

    def patch(self, api: CustomObjectsApi, status: dict[str, Any]) -> None:
        group, version, plural = self.resource
        api.patch_namespaced_custom_object_status(group, version, self.namespace, plural, self.name, {"status": status})

    def run(self) -> None:
        from kubernetes import watch

        try:
            with self.cluster.api_client() as client:
                api = CustomObjectsApi(client)
                group, version, plural = self.resource
                for event in watch.Watch().stream(api.list_namespaced_custom_object, group, version, self.namespace,
                                                  plural, field_selector=f"metadata.name={self.name}",
                                                  timeout_seconds=60):
                    if event["type"] == "ADDED":
                        break
                else:
                    raise AssertionError(f"{self.name} was never created")
                for status, expect in self.steps:
                    self.patch(api, status)
                    deadline = time.monotonic() + 30
                    while self.seen is not None and not (self.seen and self.seen[-1].startswith(expect)):
                        if time.monotonic() > deadline:
                            raise AssertionError(f"the waiter never reported {expect!r}; it reported {self.seen}")
                        time.sleep(0.02)
                if self.act:
                    self.act(api)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> None:
        self.join(60)
        assert not self.is_alive(), "the controller stand-in did not finish"
        if self.error:
            raise self.error


def _cfg(namespace: str, *, store: str = "s3://ml-artifacts/kubeml", **training):
    launcher = {"namespace": namespace, **training.pop("launcher", {})}
    return KubemlConfig(environments={"staging": {"artifact_store": {"uri": store},
                                                  "training": {"workers": 1, **training, "launcher": launcher}}}
                        ).environment("staging")


def _rayjob(namespace: str, run_id: str = "r1") -> dict[str, Any]:
    return rayjob_manifest(_cfg(namespace, launcher={"gpus_per_worker": 0}), run_id=run_id, dataset="digits", dataset_version="v-1")


def _get(admin, resource, namespace: str, name: str) -> dict[str, Any]:
    group, version, plural = resource
    return CustomObjectsApi(admin).get_namespaced_custom_object(group, version, namespace, plural, name)


RAY_SUCCESS = [
    ({"jobDeploymentStatus": "Initializing"}, "Initializing"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "kubeml-r1-abcde"}, "Running / RUNNING"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "message": "Job finished successfully."},
     "Complete / SUCCEEDED"),
]


def test_rayjob_is_created_for_real_and_each_transition_is_reported_until_success(cluster, admin, namespace):
    job = _rayjob(namespace)
    seen: list[str] = []
    operator = ControllerStandIn(cluster, namespace, RAY, job["metadata"]["name"], steps=RAY_SUCCESS, seen=seen)
    operator.start()

    outcome = run_job(job, api_client=admin, poll_s=0.05, timeout_s=60, on_status=seen.append)
    operator.finish()

    assert seen == ["Pending", "Initializing", "Running / RUNNING", "Complete / SUCCEEDED: Job finished successfully."]
    assert outcome.transitions == tuple(seen) and outcome.status == "Complete / SUCCEEDED"
    assert not outcome.adopted and not outcome.replaced
    stored = _get(admin, RAY, namespace, job["metadata"]["name"])
    # Created, not dry-run: it passed the CRD schema and nothing the job needs was pruned.
    assert stored["spec"]["entrypoint"] == "python -m kubeml.training.ray_main"
    assert stored["spec"]["runtimeEnvYAML"] == job["spec"]["runtimeEnvYAML"]
    # (numOfHosts is the CRD's default, added by the apiserver.)
    assert stored["spec"]["rayClusterSpec"]["workerGroupSpecs"] == [
        {**group, "numOfHosts": 1} for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert stored["metadata"]["annotations"]["kubeml.io/run-id"] == "r1"


def test_failed_rayjob_raises_with_the_message_from_its_status(cluster, admin, namespace):
    job = _rayjob(namespace)
    seen: list[str] = []
    message = "Job entrypoint command failed with exit code 1: torch.OutOfMemoryError: CUDA out of memory"
    operator = ControllerStandIn(cluster, namespace, RAY, job["metadata"]["name"], seen=seen, steps=[
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running / RUNNING"),
        ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": message},
         "Failed / FAILED"),
    ])
    operator.start()

    with pytest.raises(JobFailed, match="ended Failed / FAILED: .*CUDA out of memory") as excinfo:
        run_job(job, api_client=admin, poll_s=0.05, timeout_s=60, on_status=seen.append)
    operator.finish()

    assert excinfo.value.status_message == f"[AppFailed] {message}"
    assert seen[-1] == f"Failed / FAILED: [AppFailed] {message}"


def test_a_retried_ray_attempt_is_not_the_end_of_the_job(cluster, admin, namespace):
    """``Retrying`` (backoffLimit) with the attempt's FAILED job status is followed, not reported as failure."""
    job = _rayjob(namespace)
    seen: list[str] = []
    operator = ControllerStandIn(cluster, namespace, RAY, job["metadata"]["name"], seen=seen, steps=[
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running / RUNNING"),
        ({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1}, "Retrying / FAILED"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running / RUNNING"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "succeeded": 1}, "Complete / SUCCEEDED"),
    ])
    operator.start()

    outcome = run_job(job, api_client=admin, poll_s=0.05, timeout_s=60, on_status=seen.append)
    operator.finish()

    assert outcome.transitions[1:] == ("Running / RUNNING", "Retrying / FAILED", "Running / RUNNING",
                                       "Complete / SUCCEEDED")


def test_wait_times_out_naming_the_last_status_and_leaves_the_job_running(admin, namespace):
    job = _rayjob(namespace)
    started = time.monotonic()

    with pytest.raises(JobTimedOut, match=r"still Pending after 1 s; it keeps running"):
        run_job(job, api_client=admin, poll_s=0.1, timeout_s=1)

    assert time.monotonic() - started < 10
    assert _get(admin, RAY, namespace, job["metadata"]["name"])["metadata"]["name"] == job["metadata"]["name"]


def test_a_retried_step_adopts_the_running_job_instead_of_failing_with_409(cluster, admin, namespace):
    job = _rayjob(namespace)
    with pytest.raises(JobTimedOut):  # the first attempt of the step: created, then the step died
        run_job(job, api_client=admin, poll_s=0.1, timeout_s=0.5)
    first = _get(admin, RAY, namespace, job["metadata"]["name"])
    operator = ControllerStandIn(cluster, namespace, RAY, job["metadata"]["name"], steps=[], act=lambda api: (
        time.sleep(0.3),
        api.patch_namespaced_custom_object_status(*RAY[:2], namespace, RAY[2], job["metadata"]["name"],
                                                  {"status": {"jobDeploymentStatus": "Complete",
                                                              "jobStatus": "SUCCEEDED"}})))
    operator.start()

    outcome = run_job(job, api_client=admin, poll_s=0.05, timeout_s=60)  # the retry: same run, same spec
    operator.finish()

    assert outcome.adopted and outcome.status == "Complete / SUCCEEDED"
    assert _get(admin, RAY, namespace, job["metadata"]["name"])["metadata"]["uid"] == first["metadata"]["uid"]


def test_a_retry_replaces_a_failed_job_of_its_run(cluster, admin, namespace):
    job = _rayjob(namespace)
    name = job["metadata"]["name"]
    operator = ControllerStandIn(cluster, namespace, RAY, name, steps=[
        ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "node lost"}, "")])
    operator.start()
    with pytest.raises(JobFailed, match="node lost"):
        run_job(job, api_client=admin, poll_s=0.05, timeout_s=60, replace_failed=False)
    operator.finish()
    failed_uid = _get(admin, RAY, namespace, name)["metadata"]["uid"]
    seen: list[str] = []

    def recreated() -> dict[str, Any] | None:
        try:
            obj = _get(admin, RAY, namespace, name)
        except ApiException as exc:
            if exc.status == 404:  # between the delete and the new create
                return None
            raise
        return obj if obj["metadata"]["uid"] != failed_uid else None

    def complete_the_new_job(api: CustomObjectsApi) -> None:
        deadline = time.monotonic() + 30
        while (new := recreated()) is None:
            assert time.monotonic() < deadline, "the failed job was never created again"
            time.sleep(0.05)
        assert "status" not in new  # a fresh object, not the failed one
        api.patch_namespaced_custom_object_status(*RAY[:2], namespace, RAY[2], name, {
            "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})

    operator = ControllerStandIn(cluster, namespace, RAY, name, act=complete_the_new_job)
    operator.start()
    outcome = run_job(job, api_client=admin, poll_s=0.05, timeout_s=60, on_status=seen.append)
    operator.finish()

    assert outcome.replaced and not outcome.adopted and outcome.status == "Complete / SUCCEEDED"
    assert seen[0] == "Pending"


def test_a_job_of_another_run_or_another_spec_is_not_adopted(admin, namespace):
    job = _rayjob(namespace, run_id="r1")
    with pytest.raises(JobTimedOut):
        run_job(job, api_client=admin, poll_s=0.1, timeout_s=0.3)
    other_run = {**job, "metadata": {**job["metadata"], "annotations": {"kubeml.io/run-id": "someone-else"}}}
    changed = rayjob_manifest(_cfg(namespace, epochs=99, launcher={"gpus_per_worker": 0}), run_id="r1", dataset="digits", dataset_version="v-1")

    with pytest.raises(JobConflict, match="belongs to run r1, not run someone-else"):
        run_job(other_run, api_client=admin, poll_s=0.1, timeout_s=5)
    with pytest.raises(JobConflict, match="built from another configuration"):
        run_job(changed, api_client=admin, poll_s=0.1, timeout_s=5)


def test_cancel_deletes_the_job(cluster, admin, namespace):
    job = _rayjob(namespace)
    stop = threading.Event()
    seen: list[str] = []
    operator = ControllerStandIn(cluster, namespace, RAY, job["metadata"]["name"], seen=seen, steps=[
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running / RUNNING")], act=lambda api: stop.set())
    operator.start()

    with pytest.raises(JobCancelled, match="the job was deleted"):
        run_job(job, api_client=admin, poll_s=0.05, timeout_s=60, stop=stop, on_status=seen.append)
    operator.finish()

    with pytest.raises(ApiException) as excinfo:
        _get(admin, RAY, namespace, job["metadata"]["name"])
    assert excinfo.value.status == 404


def test_sigterm_to_the_train_command_deletes_its_job(cluster, admin, namespace, tmp_path):
    """KFP cancels a step by terminating its pod: the waiter must take its job down with it."""
    job = _rayjob(namespace)
    (tmp_path / "job.json").write_text(json.dumps(job))
    code = ("import json, sys\n"
            "from kubeml.training.launchers import cancel_on_sigterm, run_job\n"
            "with cancel_on_sigterm() as stop:\n"
            "    run_job(json.load(open(sys.argv[1])), poll_s=0.1, timeout_s=120, stop=stop,\n"
            "            on_status=lambda s: print(s, flush=True))\n")
    env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "job.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "Pending"  # created and followed
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()

    assert proc.returncode == 1 and "JobCancelled" in err
    with pytest.raises(ApiException) as excinfo:
        _get(admin, RAY, namespace, job["metadata"]["name"])
    assert excinfo.value.status == 404


def test_training_job_follows_sagemaker_status_and_returns_the_model_artifacts(cluster, admin, namespace):
    job = training_job_manifest(_cfg(namespace, use_gpu=True), run_id="r1", dataset="digits", dataset_version="v-1")
    seen: list[str] = []
    arn = "arn:aws:sagemaker:us-east-1:123456789012:training-job/kubeml-r1"
    model = "s3://ml-artifacts/kubeml/sagemaker/output/kubeml-r1/output/model.tar.gz"
    synced = [{"type": "ACK.ResourceSynced", "status": "True"}]
    controller = ControllerStandIn(cluster, namespace, ACK, job["metadata"]["name"], seen=seen, steps=[
        ({"conditions": [{"type": "ACK.ResourceSynced", "status": "False", "message": "creating in SageMaker"}]},
         "Pending: ACK.ResourceSynced: creating in SageMaker"),
        ({"ackResourceMetadata": {"arn": arn, "ownerAccountID": "123456789012", "region": "us-east-1"},
          "trainingJobStatus": "InProgress", "secondaryStatus": "Starting", "conditions": synced}, "InProgress / Starting"),
        ({"secondaryStatus": "Training"}, "InProgress / Training"),
        ({"secondaryStatus": "Uploading"}, "InProgress / Uploading"),
        ({"trainingJobStatus": "Completed", "secondaryStatus": "Completed", "modelArtifacts": {"s3ModelArtifacts": model}},
         "Completed / Completed"),
    ])
    controller.start()

    outcome = run_job(job, api_client=admin, poll_s=0.05, timeout_s=60, on_status=seen.append)
    controller.finish()

    assert seen == ["Pending", "Pending: ACK.ResourceSynced: creating in SageMaker", "InProgress / Starting",
                    "InProgress / Training", "InProgress / Uploading", "Completed / Completed"]
    assert outcome.model_artifacts == model and outcome.kind == "TrainingJob"
    stored = _get(admin, ACK, namespace, job["metadata"]["name"])
    assert stored["spec"] == job["spec"]  # created for real: every field passed the schema, nothing pruned


@pytest.mark.parametrize(("status", "expected"), [
    ({"trainingJobStatus": "Failed", "secondaryStatus": "Failed",
      "failureReason": "AlgorithmError: ExecuteUserScriptError: exit code 1"},
     r"ended Failed / Failed: AlgorithmError: ExecuteUserScriptError"),
    ({"conditions": [{"type": "ACK.Terminal", "status": "True",
                      "message": "ValidationException: Could not assume role arn:aws:iam::123456789012:role/x"}]},
     r"ended Pending / ACK.Terminal: ValidationException: Could not assume role"),
])
def test_failed_training_job_raises_with_sagemakers_reason(cluster, admin, namespace, status, expected):
    job = training_job_manifest(_cfg(namespace, use_gpu=True), run_id="r1", dataset="digits", dataset_version="v-1")
    controller = ControllerStandIn(cluster, namespace, ACK, job["metadata"]["name"], steps=[(status, "")])
    controller.start()

    with pytest.raises(JobFailed, match=expected):
        run_job(job, api_client=admin, poll_s=0.05, timeout_s=60)
    controller.finish()


def test_the_documented_rbac_rules_are_enough_to_run_a_job(cluster, admin, namespace):
    """The step's identity needs exactly ``RBAC_RULES``: no list, watch or patch."""
    rbac = RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "kubeml-train"}, "rules": list(RBAC_RULES)})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "kubeml-train"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubeml-train"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "pipeline-runner"}],
    })
    job = _rayjob(namespace)
    with cluster.api_client("pipeline-runner") as client:
        api = CustomObjectsApi(client)

        def can_get() -> bool:
            try:
                api.get_namespaced_custom_object(*RAY[:2], namespace, RAY[2], "absent")
            except ApiException as exc:
                return exc.status == 404
            return True

        wait_until(can_get, timeout_s=10, what="the RoleBinding to apply")
        stop = threading.Event()
        seen: list[str] = []
        operator = ControllerStandIn(cluster, namespace, RAY, job["metadata"]["name"], steps=RAY_SUCCESS[:2],
                                     seen=seen, act=lambda api: stop.set())
        operator.start()
        with pytest.raises(JobCancelled):  # create, get and (on cancel) delete, all as the runner
            run_job(job, api_client=client, poll_s=0.05, timeout_s=60, stop=stop, on_status=seen.append)
        operator.finish()
        with pytest.raises(ApiException) as excinfo:
            api.list_namespaced_custom_object(*RAY[:2], namespace, RAY[2])
    assert excinfo.value.status == 403  # least privilege: nothing beyond the rules was granted
    assert seen[:3] == ["Pending", "Initializing", "Running / RUNNING"]


# ------------------------------------------------------------------ the train stage and the CLI on a cluster


@pytest.fixture
def kubeconfig(cluster, monkeypatch):
    """The step's view of the cluster: credentials from KUBECONFIG (in a pod: in-cluster ones)."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.admin_kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return cluster.admin_kubeconfig


def _kuberay_env(namespace: str, bucket: str, s3_endpoint: str, tmp_path) -> dict[str, Any]:
    return {"artifact_store": {"uri": f"s3://{bucket}/kubeml", "endpoint_url": s3_endpoint},
            "home": str(tmp_path / "home"),
            "data": {"max_rows": 400},
            "training": {"target": "kuberay", "workers": 1, "epochs": 4, "validation_fraction": 0.0,
                         "launcher": {"namespace": namespace, "gpus_per_worker": 0, "poll_s": 0.2,
                                      "wait_timeout_s": 600,
                                      # what the pods would dial; no pod runs here
                                      "artifact_endpoint_url": "http://s3.kubeml-system.svc:5000"}}}


def test_kubeml_train_target_kuberay_follows_the_job_and_reports_its_failure(
        cluster, namespace, bucket, s3_endpoint, kubeconfig, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from kubeml.cli import app

    env = _kuberay_env(namespace, bucket, s3_endpoint, tmp_path)
    env["training"]["target"] = "local"  # --target picks the launcher
    (tmp_path / "kubeml.yaml").write_text(yaml.safe_dump({"environments": {"staging": env}}))
    monkeypatch.chdir(tmp_path)
    operator = ControllerStandIn(cluster, namespace, RAY, "kubeml-cli-1", steps=[
        ({"jobDeploymentStatus": "Initializing"}, ""),
        ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
          "message": "ModuleNotFoundError: No module named 'kubeml'"}, "")])
    operator.start()

    result = CliRunner().invoke(app, ["train", "--env", "staging", "--target", "kuberay", "--run-id", "cli-1"])
    text = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1, result.output
    operator.finish()
    assert "RayJob status: Pending" in text
    assert "ended Failed / FAILED: [AppFailed] ModuleNotFoundError: No module named 'kubeml'" in text
