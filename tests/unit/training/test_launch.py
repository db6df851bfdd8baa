"""The launcher choice of the train stage and the pieces of submit-and-wait that need no cluster.

Submitting and following real objects is in ``tests/integration/test_training_launch.py``
(on the test control plane); here: reading job states, naming, the result record, errors
crossing processes, SIGTERM, and which path the train stage takes for an environment.
"""

from __future__ import annotations

import os
import pickle
import signal

import pytest

from kubeml.artifacts import open_store
from kubeml.config import KubemlConfig
from kubeml.errors import ConfigError, JobError, JobFailed
from kubeml.ledger import Ledger
from kubeml.training.launchers import (
    build_manifest,
    cancel_on_sigterm,
    job_state,
    read_result,
    result_key,
    spec_hash,
)
from kubeml.training.launchers.kuberay import MAX_RAYJOB_NAME, rayjob_name


def _ray(**status):
    return {"kind": "RayJob", "status": status}


def _ack(**status):
    return {"kind": "TrainingJob", "status": status}


@pytest.mark.parametrize(("obj", "text", "done", "ok"), [
    ({"kind": "RayJob"}, "Pending", False, False),
    (_ray(jobDeploymentStatus="Initializing"), "Initializing", False, False),
    (_ray(jobDeploymentStatus="Running", jobStatus="RUNNING"), "Running / RUNNING", False, False),
    # A failed attempt KubeRay will retry (backoffLimit) is not the end.
    (_ray(jobDeploymentStatus="Retrying", jobStatus="FAILED"), "Retrying / FAILED", False, False),
    (_ray(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"), "Complete / SUCCEEDED", True, True),
    # KubeRay < 1.2 ends a failed job as Complete; a stopped job is not a success either.
    (_ray(jobDeploymentStatus="Complete", jobStatus="FAILED"), "Complete / FAILED", True, False),
    (_ray(jobDeploymentStatus="Complete", jobStatus="STOPPED"), "Complete / STOPPED", True, False),
    (_ray(jobDeploymentStatus="Failed", jobStatus="FAILED"), "Failed / FAILED", True, False),
    (_ray(jobDeploymentStatus="ValidationFailed"), "ValidationFailed", True, False),
    (_ack(), "Pending", False, False),
    (_ack(trainingJobStatus="InProgress", secondaryStatus="Training"), "InProgress / Training", False, False),
    (_ack(trainingJobStatus="Stopping", secondaryStatus="Stopping"), "Stopping / Stopping", False, False),
    (_ack(trainingJobStatus="Completed", secondaryStatus="Completed"), "Completed / Completed", True, True),
    (_ack(trainingJobStatus="Failed", secondaryStatus="Failed"), "Failed / Failed", True, False),
    (_ack(trainingJobStatus="Stopped", secondaryStatus="MaxWaitTimeExceeded"), "Stopped / MaxWaitTimeExceeded",
     True, False),
])
def test_job_state_reads_kuberay_and_sagemaker_statuses(obj, text, done, ok):
    state = job_state(obj)
    assert (state.text, state.done, state.succeeded) == (text, done, ok)


def test_job_state_carries_the_controllers_message():
    ray = job_state(_ray(jobDeploymentStatus="ValidationFailed", reason="ValidationFailed",
                         message="RayJob name should be no more than 47 characters"))
    assert ray.line() == "ValidationFailed: [ValidationFailed] RayJob name should be no more than 47 characters"
    terminal = job_state(_ack(conditions=[{"type": "ACK.Terminal", "status": "True", "message": "bad role"}]))
    assert (terminal.done, terminal.succeeded, terminal.message) == (True, False, "bad role")
    stuck = job_state(_ack(conditions=[{"type": "ACK.Recoverable", "status": "True", "message": "AccessDenied"},
                                       {"type": "ACK.ResourceSynced", "status": "False"}]))
    assert (stuck.done, stuck.line()) == (False, "Pending: ACK.Recoverable: AccessDenied")
    failed = job_state(_ack(trainingJobStatus="Failed", failureReason="AlgorithmError: OOM",
                            conditions=[{"type": "ACK.Terminal", "status": "True", "message": "failed"}]))
    assert failed.line() == "Failed: AlgorithmError: OOM"


def test_job_state_refuses_other_kinds():
    with pytest.raises(ValueError, match="cannot follow a 'Job'; supported kinds: RayJob, TrainingJob"):
        job_state({"kind": "Job"})


def test_long_run_ids_give_distinct_rayjob_names_kuberay_accepts():
    a, b = "nightly-retraining-" + "x" * 40 + "-1", "nightly-retraining-" + "x" * 40 + "-2"
    assert len(rayjob_name(a)) <= MAX_RAYJOB_NAME and len(rayjob_name(b)) <= MAX_RAYJOB_NAME
    assert rayjob_name(a) != rayjob_name(b)
    assert rayjob_name("Run_42") == "kubeml-run-42"
    with pytest.raises(ConfigError, match="no letters or digits"):
        rayjob_name("__")


def _env(store: str, **training):
    return KubemlConfig(environments={"staging": {"artifact_store": {"uri": store}, "training": training}}
                        ).environment("staging")


def test_manifests_carry_the_run_id_and_the_resume_flag():
    cfg = _env("s3://ml-artifacts/kubeml", use_gpu=True)
    for target in ("kuberay", "sagemaker"):
        job, _ = build_manifest(cfg, target, run_id="r-7", dataset="digits", dataset_version="v-1", resume=True)
        assert job["metadata"]["annotations"] == {"kubeml.io/run-id": "r-7"}
        assert "KUBEML_RESUME" in str(job["spec"])
        again, _ = build_manifest(cfg, target, run_id="r-7", dataset="digits", dataset_version="v-1", resume=True)
        assert spec_hash(again) == spec_hash(job)  # a retried step builds the same job
    with pytest.raises(ConfigError, match="cluster targets: kuberay, sagemaker"):
        build_manifest(cfg, "local", run_id="r", dataset="d", dataset_version="v")


def test_wait_timeouts_default_to_the_jobs_own_limits():
    from kubeml.training.launchers.kuberay import KubeRayOptions
    from kubeml.training.launchers.sagemaker import SageMakerOptions

    assert KubeRayOptions().effective_wait_timeout_s == 24 * 3600
    assert KubeRayOptions(active_deadline_seconds=7200).effective_wait_timeout_s == 7200 + 3600
    assert SageMakerOptions().effective_wait_timeout_s == 172_800 + 3600  # spot: max_wait_s
    assert SageMakerOptions(spot=False, max_run_s=600).effective_wait_timeout_s == 600 + 3600
    assert SageMakerOptions(wait_timeout_s=5).effective_wait_timeout_s == 5


def test_missing_result_record_names_the_key(tmp_path):
    store = open_store(f"file://{tmp_path}")
    with pytest.raises(JobError, match=f"wrote no result record at .*{result_key('r1')}"):
        read_result(store, "r1")


def test_job_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(JobFailed("RayJob ns/x ended Failed", "OOM")))
    assert str(err) == "RayJob ns/x ended Failed" and err.status_message == "OOM"


def test_sigterm_sets_the_cancel_event_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with cancel_on_sigterm() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------ the train stage's choice


def test_train_stage_on_a_kuberay_environment_takes_the_submit_path(tmp_path):
    """``training.target: kuberay`` goes to submit-and-wait, which needs a store the job shares."""
    from kubeml.pipelines.stages import train_stage

    cfg = _env(f"file://{tmp_path}/artifacts", target="kuberay")
    with pytest.raises(ConfigError, match="training.target kuberay needs an artifact store .* s3://"):
        train_stage(cfg.model_dump_json(), "r1", "digits", "v-1")
    rec = Ledger(open_store(cfg.artifact_store.uri), "r1").read("train")
    assert rec.status == "failed" and "s3://" in rec.message


@pytest.mark.slow
def test_train_stage_on_dev_trains_locally(tmp_path):
    import ray

    from kubeml.pipelines.stages import ingest_stage, train_stage

    cfg = KubemlConfig(environments={"dev": {"data": {"max_rows": 200},
                                             "training": {"workers": 1, "epochs": 1, "validation_fraction": 0.0}}}
                       ).environment("dev", base=tmp_path)
    assert cfg.training.target == "local"
    started_here = not ray.is_initialized()
    try:
        dataset, version = ingest_stage(cfg.model_dump_json(), "r1")
        bundle_key = train_stage(cfg.model_dump_json(), "r1", dataset, version)
    finally:
        if started_here:
            ray.shutdown()
    store = open_store(cfg.artifact_store.uri)
    rec = Ledger(store, "r1").read("train")
    assert bundle_key == "models/r1/bundle" and store.list(bundle_key)
    assert rec.outputs["target"] == "local" and "job" not in rec.outputs and rec.outputs["epochs"] == 1
