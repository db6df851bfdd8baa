"""Launchers: the target seam, RayJob and ACK TrainingJob manifests, the SageMaker SDK configuration,
the entry point."""

from __future__ import annotations

import json
import pickle

import pytest
from kubernetes.client.exceptions import ApiException

from kubeml.config import KubemlConfig
from kubeml.artifacts import open_store
from kubeml.errors import ConfigError, JobError, is_retryable
from kubeml.training.launchers import RBAC_RULES, TrainOutcome, get_launcher, result_key
from kubeml.training.launchers._jobs import JobApiError
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


# ------------------------------------------------------------------ the target seam


@pytest.mark.parametrize("target", ["local", "kuberay", "sagemaker"])
def test_get_launcher_returns_the_launcher_of_each_target(target):
    launcher = get_launcher(target)
    assert launcher.name == target
    assert callable(launcher.train)


def test_unknown_target_names_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"training\.target 'slurm' .*allowed values: kuberay, local, sagemaker"):
        get_launcher("slurm")


def test_rbac_rules_stay_importable_from_the_package():
    assert {g for rule in RBAC_RULES for g in rule["apiGroups"]} == {"ray.io", "sagemaker.services.k8s.aws", ""}
    # The core group only to diagnose: read pods and their logs, never change them.
    core = [rule for rule in RBAC_RULES if rule["apiGroups"] == [""]]
    assert {v for rule in core for v in rule["verbs"]} == {"get", "list"}


class _Api:
    """A ``CustomObjectsApi`` stand-in: ``create`` answers with ``answer`` (an object, or an error to raise)."""

    def __init__(self, answer):
        self.answer = answer
        self.created = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self.created.append(body)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return {**body, **self.answer}


class _S3Store:
    """A file store that says it is on S3: the cluster path refuses any other store before it starts."""

    uri = "s3://ml-artifacts/kubeml"

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize(("status", "retryable"), [(401, False), (403, False), (404, False), (422, False),
                                                   (429, True), (500, True), (503, True)])
@pytest.mark.parametrize("target", ["kuberay", "sagemaker"])
def test_cluster_launcher_api_errors_keep_their_retryable_meaning(monkeypatch, tmp_path, target, status, retryable):
    monkeypatch.setattr("kubeml.training.launchers._jobs.custom_objects_api",
                        lambda api_client=None: _Api(ApiException(status=status, reason="answer")))
    store = _S3Store(open_store(f"file://{tmp_path}"))
    with pytest.raises(JobError) as info:
        get_launcher(target).train(_cfg(target=target, use_gpu=True), store, run_id="r1", dataset="digits",
                                   dataset_version="v-1")
    assert isinstance(info.value, JobApiError) and info.value.status == status
    assert is_retryable(info.value) is retryable
    again = pickle.loads(pickle.dumps(info.value))  # it crosses KFP and Ray process boundaries
    assert (str(again), again.status, is_retryable(again)) == (str(info.value), status, retryable)
    if status in (401, 403):
        assert "kubeml.training.launchers.RBAC_RULES" in str(info.value)


def test_cluster_launcher_hands_back_the_bundle_and_the_job_record(monkeypatch, tmp_path):
    api = _Api({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
    monkeypatch.setattr("kubeml.training.launchers._jobs.custom_objects_api", lambda api_client=None: api)
    store = _S3Store(open_store(f"file://{tmp_path}"))
    store.put_text("models/r1/bundle/spec.json", "{}")
    store.put_text(result_key("r1"), json.dumps({
        "run_id": "r1", "bundle_key": "models/r1/bundle", "checkpoint_uri": "s3://ml-artifacts/kubeml/checkpoints/c",
        "epochs": 2, "history": [{"loss": 1.0}, {"loss": 0.5}], "time_to_first_step_s": 3.5}))
    seen = []
    out = get_launcher("kuberay").train(_cfg(target="kuberay", use_gpu=True), store, run_id="r1", dataset="digits",
                                        dataset_version="v-1", on_status=seen.append)
    assert isinstance(out, TrainOutcome)
    assert (out.bundle_key, out.epochs, out.history, out.time_to_first_step_s) == (
        "models/r1/bundle", 2, ({"loss": 1.0}, {"loss": 0.5}), 3.5)
    assert seen == ["Complete / SUCCEEDED"]
    job = out.job
    assert set(job) == {"kind", "namespace", "name", "status", "transitions", "adopted", "replaced", "wait_s",
                        "model_artifacts"}
    assert (job["kind"], job["name"], job["status"], job["transitions"], job["adopted"]) == (
        "RayJob", "kubeml-r1", "Complete / SUCCEEDED", ["Complete / SUCCEEDED"], False)
    assert api.created[0]["metadata"]["annotations"]["kubeml.io/run-id"] == "r1"


def test_local_launcher_runs_fit_here_and_has_no_job(monkeypatch, tmp_path):
    from kubeml.training.fit import TrainResult

    calls = []

    def fake_fit(cfg, store, *, dataset, dataset_version, run_id):
        calls.append((dataset, dataset_version, run_id))
        return TrainResult(run_id=run_id, bundle_key=f"models/{run_id}/bundle", epochs=1, history=({"loss": 0.1},),
                           checkpoint_uri="file:///c", time_to_first_step_s=2.0, wall_s=5.0)

    monkeypatch.setattr("kubeml.training.fit.fit", fake_fit)
    out = get_launcher("local").train(_cfg(), open_store(f"file://{tmp_path}"), run_id="r1", dataset="digits",
                                      dataset_version="v-1")
    assert calls == [("digits", "v-1", "r1")]
    assert out == TrainOutcome(bundle_key="models/r1/bundle", checkpoint_uri="file:///c", epochs=1,
                               history=({"loss": 0.1},), time_to_first_step_s=2.0, job=None)


def test_rayjob_gives_every_gpu_of_a_pod_its_own_ray_worker():
    cfg = _cfg(workers=2, use_gpu=True, cpus_per_worker=1.0,
               launcher={"node_group": "gpu-p4d", "gpus_per_worker": 8, "cpus_per_worker": "10"})
    job = rayjob_manifest(cfg, run_id="fan-out", dataset="digits", dataset_version="v-1")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2
    assert group["rayStartParams"] == {"num-gpus": "8"}
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    worker_training = json.loads(json.loads(job["spec"]["runtimeEnvYAML"])["env_vars"]["KUBEML_CONFIG"])["training"]
    # 2 pods x 8 GPUs: 16 Ray Train workers of one GPU each.
    assert worker_training["workers"] == 16 and worker_training["use_gpu"] is True
    assert worker_training["target"] == "local"


def test_rayjob_on_cpu_keeps_one_ray_worker_per_pod():
    job = rayjob_manifest(_cfg(workers=3, launcher={"gpus_per_worker": 0}), run_id="cpu",
                          dataset="digits", dataset_version="v-1")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 3 and group["rayStartParams"] == {}
    env = json.loads(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert json.loads(env["KUBEML_CONFIG"])["training"]["workers"] == 3


@pytest.mark.parametrize(("pod_cpus", "message"), [
    ("4", "needs 16 CPUs per pod, but training.launcher.cpus_per_worker is 4"),
    ("eight", "'eight' is not a CPU quantity"),
])
def test_rayjob_refuses_pods_too_small_for_their_ray_workers(pod_cpus, message):
    cfg = _cfg(workers=1, use_gpu=True, cpus_per_worker=2.0,
               launcher={"gpus_per_worker": 8, "cpus_per_worker": pod_cpus})
    with pytest.raises(ConfigError, match=message):
        rayjob_manifest(cfg, run_id="r", dataset="d", dataset_version="v")


def test_cpu_limits_above_the_requests_let_small_ray_pods_start_on_spare_cpu():
    job = rayjob_manifest(_cfg(workers=1, launcher={
        "gpus_per_worker": 0, "cpus_per_worker": "600m", "worker_cpu_limit": "2", "head_cpu": "400m",
        "head_cpu_limit": "1500m", "submitter_cpu": "200m", "submitter_cpu_limit": "1"}),
        run_id="burst", dataset="digits", dataset_version="v-1")
    pods = _pods(job)
    resources = {role: pod["containers"][0]["resources"] for role, pod in pods.items()}
    assert resources["worker"] == {"requests": {"cpu": "600m", "memory": "100Gi"},
                                   "limits": {"cpu": "2", "memory": "100Gi"}}
    assert resources["head"]["requests"]["cpu"] == "400m" and resources["head"]["limits"]["cpu"] == "1500m"
    assert resources["submitter"]["requests"]["cpu"] == "200m" and resources["submitter"]["limits"]["cpu"] == "1"
    # Memory stays Guaranteed: a pod over its request would be the first one evicted.
    assert all(r["requests"]["memory"] == r["limits"]["memory"] for r in resources.values())


def test_without_cpu_limits_the_ray_pods_are_guaranteed():
    job = rayjob_manifest(_cfg(workers=1, launcher={"gpus_per_worker": 0}), run_id="g", dataset="d",
                          dataset_version="v")
    for pod in _pods(job).values():
        resources = pod["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], resources
    assert job["spec"]["submitterConfig"] == {"backoffLimit": 2}


@pytest.mark.parametrize(("launcher", "message"), [
    ({"head_cpu": "2", "head_cpu_limit": "500m"}, "head_cpu_limit 500m is below head_cpu 2"),
    ({"cpus_per_worker": "4", "worker_cpu_limit": "3.5"}, "worker_cpu_limit 3.5 is below cpus_per_worker 4"),
    ({"head_cpu_limit": "lots"}, "head_cpu_limit 'lots' is not a CPU quantity"),
])
def test_a_cpu_limit_below_its_request_is_refused(launcher, message):
    with pytest.raises(ConfigError, match=message):
        KubeRayOptions.from_training(_cfg(launcher=launcher).training)


def _pods(job):
    cluster = job["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            "worker": cluster["workerGroupSpecs"][0]["template"]["spec"],
            "submitter": job["spec"]["submitterPodTemplate"]["spec"]}


def test_rayjob_submitter_pod_passes_restricted_like_the_ray_pods():
    job = rayjob_manifest(_cfg(launcher={"gpus_per_worker": 0, "head_node_group": "cpu",
                                         "head_tolerations": [{"key": "a", "operator": "Exists"}]}),
                          run_id="r", dataset="d", dataset_version="v")
    submitter = _pods(job)["submitter"]
    assert submitter["securityContext"]["runAsNonRoot"] is True
    assert submitter["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = submitter["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == _pods(job)["head"]["containers"][0]["image"]
    # KubeRay writes the `ray job submit` command only into a container that has none.
    assert "command" not in container and "args" not in container
    assert submitter["restartPolicy"] == "Never"
    assert submitter["nodeSelector"] == {"eks.amazonaws.com/nodegroup": "cpu"}
    assert submitter["tolerations"] == [{"key": "a", "operator": "Exists"}]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "1Gi"}


def test_ray_pods_are_probed_by_the_kubelet_not_by_a_binary_the_image_may_lack():
    """KubeRay's default probes exec wget, which a slim image lacks; ours are kubelet probes
    of Ray's health endpoints, readiness and liveness different (kube-score flags identical ones)."""
    pods = _pods(rayjob_manifest(_cfg(launcher={"gpus_per_worker": 0}), run_id="r", dataset="d",
                                 dataset_version="v"))
    raylet = {"path": "/api/local_raylet_healthz", "port": 52365}
    head, worker = pods["head"]["containers"][0], pods["worker"]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/api/gcs_healthz", "port": 8265}
    assert head["livenessProbe"]["httpGet"] == raylet
    assert worker["readinessProbe"]["httpGet"] == raylet
    assert worker["livenessProbe"]["tcpSocket"] == {"port": 52365}
    for container in (head, worker):
        assert "exec" not in container["readinessProbe"] and "exec" not in container["livenessProbe"]
        # Restarted only after minutes of failed checks: a busy head is not killed mid-job.
        assert container["livenessProbe"]["failureThreshold"] * container["livenessProbe"]["periodSeconds"] >= 600


def test_rayjob_env_secret_reaches_head_workers_and_submitter():
    job = rayjob_manifest(_cfg(launcher={"gpus_per_worker": 0, "env_secret": "s3-credentials"}),
                          run_id="r", dataset="d", dataset_version="v")
    for role, pod in _pods(job).items():
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}], role
    plain = rayjob_manifest(_cfg(launcher={"gpus_per_worker": 0}), run_id="r", dataset="d", dataset_version="v")
    assert all("envFrom" not in pod["containers"][0] for pod in _pods(plain).values())
    with pytest.raises(ConfigError, match="env_secret"):
        rayjob_manifest(_cfg(launcher={"env_secret": "Not A Name"}), run_id="r", dataset="d", dataset_version="v")


def test_the_pods_config_has_their_home_and_their_view_of_the_s3_endpoint():
    cfg = KubemlConfig(environments={"staging": {
        "home": "/home/alice/.kubeml",
        "artifact_store": {"uri": "s3://b/kubeml", "endpoint_url": "http://127.0.0.1:9000"},
        "training": {"launcher": {"gpus_per_worker": 0, "artifact_endpoint_url": "http://minio.data.svc:9000"}}},
    }).environment("staging")
    job = rayjob_manifest(cfg, run_id="r", dataset="d", dataset_version="v")
    pod_cfg = json.loads(json.loads(job["spec"]["runtimeEnvYAML"])["env_vars"]["KUBEML_CONFIG"])
    assert pod_cfg["home"] == "/tmp/kubeml"
    assert pod_cfg["artifact_store"] == {**cfg.artifact_store.model_dump(), "endpoint_url": "http://minio.data.svc:9000"}
    # The submitting side keeps its own view.
    assert cfg.artifact_store.endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "http://localhost:4566", "http://[::1]:9000",
                                      "https://127.3.0.9"])
def test_a_loopback_s3_endpoint_is_refused_for_the_pods_with_what_to_set(endpoint):
    cfg = KubemlConfig(environments={"staging": {
        "artifact_store": {"uri": "s3://b/kubeml", "endpoint_url": endpoint},
        "training": {"launcher": {"gpus_per_worker": 0}}}}).environment("staging")
    with pytest.raises(ConfigError, match="training.launcher.artifact_endpoint_url"):
        rayjob_manifest(cfg, run_id="r", dataset="d", dataset_version="v")
