"""``kubeml run --target kubeflow`` / ``kubeml pipeline submit|follow|schedule`` through ``kfp.Client``.

The KFP API here is a stand-in (:mod:`kubeml.testing.kfp_api`): the KFP backend (a Go
server with MySQL, Argo and a metadata store) is not built by this project. The stand-in
checks every request against the ``kfp-server-api`` models and KFP's submission rules, and
runs nothing: where a backend would run the steps, each test writes what the steps would
write (the run ledger, in moto's S3) and moves the run's state. What is under test is the
client side: what is sent, with which credentials, what is refused before anything is
created, and how the outcome becomes the exit code a local run would give.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kubeml.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_GATE, app
from kubeml.cli._common import EXIT_OK
from kubeml.ledger import Ledger, StageRecord
from kubeml.testing.kfp_api import KfpApiStandIn, model_errors

pytestmark = pytest.mark.integration

runner = CliRunner()
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/kubeml/kubeml-python:1.2.3"


def _config(tmp_path: Path, bucket: str, s3_endpoint: str, **kubeflow: Any) -> Path:
    env = {
        "artifact_store": {"uri": f"s3://{bucket}/kubeml", "endpoint_url": s3_endpoint},
        "registry": {"tracking_uri": "http://mlflow.kubeml-system.svc:5000"},
        "kubeflow": {"poll_s": 0.2, "request_timeout_s": 10, **kubeflow},
    }
    path = tmp_path / "kubeml.yaml"
    path.write_text(yaml.safe_dump({"project": "test", "environments": {"staging": env}}))
    return path


def _invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def _records(stages: dict[str, tuple[str, dict[str, Any]]]) -> list[StageRecord]:
    now = time.time()
    return [StageRecord(stage=name, status=status, started=now - 1, finished=now, outputs=outputs,
                        message=outputs.pop("_message", ""), error=outputs.pop("_error", ""))
            for name, (status, outputs) in stages.items()]


SUCCESS = {
    "ingest": ("succeeded", {"dataset": "digits", "version": "v-abc"}),
    "validate": ("succeeded", {}),
    "train": ("succeeded", {"bundle_key": "models/r/bundle"}),
    "evaluate": ("succeeded", {"accuracy": 0.981, "macro_f1": 0.979}),
    "gate": ("succeeded", {"passed": True, "reasons": []}),
    "register": ("succeeded", {"model_name": "digits-cnn", "version": 3, "approval_status": "pending"}),
    "deploy": ("succeeded", {"v2_url": "http://digits.team-a.svc/v2/models/digits-cnn"}),
}


class _Backend(threading.Thread):
    """Plays what the backend's steps would do for the first run created: write the ledger
    records ``stages`` to the store, then move the run to ``final`` with ``tasks``."""

    def __init__(self, api: KfpApiStandIn, bucket: str, s3_endpoint: str, stages: dict, final: str,
                 tasks: tuple = (), error: str | None = None):
        super().__init__(daemon=True)
        self.api, self.bucket, self.endpoint = api, bucket, s3_endpoint
        self.stages, self.final, self.tasks, self.error = stages, final, tasks, error
        self.failure: BaseException | None = None

    def run(self) -> None:
        from kubeml.artifacts import open_store

        try:
            deadline = time.monotonic() + 60
            while not self.api.runs:
                assert time.monotonic() < deadline, "no run was created"
                time.sleep(0.05)
            kfp_run_id, run = next(iter(self.api.runs.items()))
            self.api.advance(kfp_run_id, "RUNNING")
            ledger = Ledger(open_store(f"s3://{self.bucket}/kubeml", endpoint_url=self.endpoint),
                            run["runtime_config"]["parameters"]["run_id"])
            for record in _records({k: (v[0], dict(v[1])) for k, v in self.stages.items()}):
                ledger.write(record)
            time.sleep(0.5)
            self.api.advance(kfp_run_id, self.final, tasks=self.tasks, error=self.error)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure = exc


def _posts(api: KfpApiStandIn) -> list[str]:
    return [r.path for r in api.requests if r.method == "POST"]


@pytest.fixture
def api() -> Any:
    with KfpApiStandIn() as server:
        server.add_experiment("kubeml")
        yield server


def test_a_run_is_submitted_followed_and_ends_with_the_local_summary(api, bucket, s3_endpoint, tmp_path):
    config = _config(tmp_path, bucket, s3_endpoint, host=api.url)
    backend = _Backend(api, bucket, s3_endpoint, SUCCESS, "SUCCEEDED")
    backend.start()
    result = _invoke("run", "--config", str(config), "--env", "staging", "--target", "kubeflow",
                     "--run-id", "kf-1", "--image", IMAGE, "--run-name", "nightly digits")
    backend.join(timeout=30)
    assert backend.failure is None, backend.failure
    assert result.exit_code == EXIT_OK, result.output
    (kfp_run_id, run), = api.runs.items()
    assert f"{api.url}/#/runs/details/{kfp_run_id}" in result.output
    assert "summary" in result.output and "digits-cnn v3 (pending)" in result.output

    # What was sent: the whole environment, the run id the ledger is keyed by, the pipeline
    # root next to the artifacts, and every kubeml step in the image asked for.
    assert run["display_name"] == "nightly digits"
    assert run["experiment_id"] == next(iter(api.experiments))
    parameters = run["runtime_config"]["parameters"]
    assert parameters["run_id"] == "kf-1"
    sent = json.loads(parameters["config_json"])
    assert sent["name"] == "staging" and sent["artifact_store"]["uri"] == f"s3://{bucket}/kubeml"
    assert run["runtime_config"]["pipeline_root"] == f"s3://{bucket}/kubeml/pipeline-root"
    spec = run["pipeline_spec"].get("pipeline_spec", run["pipeline_spec"])
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    assert set(spec["root"]["dag"]["tasks"]) >= {"ingest", "validate", "train", "evaluate", "gate"}
    # The run's own record says where it ran.
    from kubeml.artifacts import open_store

    record = json.loads(open_store(f"s3://{bucket}/kubeml", endpoint_url=s3_endpoint).get_text("runs/kf-1/run.json"))
    assert record["target"] == "kubeflow" and record["kfp_run_id"] == kfp_run_id


def test_a_gate_that_says_no_exits_3_as_locally(api, bucket, s3_endpoint, tmp_path):
    stages = {**{k: SUCCESS[k] for k in ("ingest", "validate", "train", "evaluate")},
              "gate": ("succeeded", {"passed": False, "reasons": ["accuracy 0.91 < 0.96"]}),
              "register": ("pending", {}), "deploy": ("pending", {})}
    backend = _Backend(api, bucket, s3_endpoint, stages, "SUCCEEDED")
    backend.start()
    result = _invoke("pipeline", "submit", "--config", str(_config(tmp_path, bucket, s3_endpoint, host=api.url)),
                     "--env", "staging", "--run-id", "kf-gate")
    backend.join(timeout=30)
    assert result.exit_code == EXIT_GATE, result.output
    assert "gate not passed" in result.output and "accuracy 0.91 < 0.96" in result.output


def test_a_failed_stage_exits_1_with_its_error(api, bucket, s3_endpoint, tmp_path):
    stages = {"ingest": SUCCESS["ingest"], "validate": ("failed", {
        "_message": "2 constraints failed", "_error": "DataValidationError: min_rows: 40 < 100"})}
    backend = _Backend(api, bucket, s3_endpoint, stages, "FAILED",
                       tasks=(("ingest", "SUCCEEDED", None), ("validate", "FAILED", "exit code 1")))
    backend.start()
    result = _invoke("run", "--config", str(_config(tmp_path, bucket, s3_endpoint, host=api.url)), "--env", "staging",
                     "--target", "kubeflow", "--run-id", "kf-bad")
    backend.join(timeout=30)
    assert result.exit_code == EXIT_FAILED, result.output
    assert "stage validate failed" in result.output and "min_rows: 40 < 100" in result.output


def test_a_run_that_fails_before_any_stage_reports_the_tasks_error(api, bucket, s3_endpoint, tmp_path):
    """A step pod that never started (an image that cannot be pulled) leaves no ledger record:
    the error comes from the run's task details."""
    backend = _Backend(api, bucket, s3_endpoint, {}, "FAILED",
                       tasks=(("ingest", "FAILED", "ImagePullBackOff: kubeml/kubeml-python:0.1.0 not found"),),
                       error="the DAG failed")
    backend.start()
    result = _invoke("run", "--config", str(_config(tmp_path, bucket, s3_endpoint, host=api.url)), "--env", "staging",
                     "--target", "kubeflow", "--run-id", "kf-pull")
    backend.join(timeout=30)
    assert result.exit_code == EXIT_FAILED, result.output
    assert "the Kubeflow run ended FAILED" in result.output
    assert "task ingest" in result.output and "ImagePullBackOff" in result.output


def test_no_wait_returns_at_once_and_follow_picks_the_run_up(api, bucket, s3_endpoint, tmp_path):
    config = _config(tmp_path, bucket, s3_endpoint, host=api.url)
    result = _invoke("run", "--config", str(config), "--env", "staging", "--target", "kubeflow",
                     "--run-id", "kf-later", "--no-wait")
    assert result.exit_code == EXIT_OK, result.output
    (kfp_run_id, run), = api.runs.items()
    assert run["state"] == "PENDING"
    assert f"kubeml pipeline follow {kfp_run_id}" in result.output

    backend = _Backend(api, bucket, s3_endpoint, SUCCESS, "SUCCEEDED")
    backend.start()
    result = _invoke("pipeline", "follow", kfp_run_id, "--config", str(config), "--env", "staging")
    backend.join(timeout=30)
    assert result.exit_code == EXIT_OK, result.output
    assert "following kubeml run kf-later" in result.output and "summary" in result.output


# --- credentials ------------------------------------------------------------------------------


def test_a_bearer_token_from_the_environment(bucket, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    with KfpApiStandIn(tokens={"tok-123": None}) as api:
        api.add_experiment("kubeml")
        config = _config(tmp_path, bucket, s3_endpoint, host=api.url, auth="token", token="env:KFP_TOKEN")
        result = _invoke("run", "--config", str(config), "--env", "staging", "--target", "kubeflow", "--no-wait")
        assert result.exit_code == EXIT_OK, result.output
        assert api.runs
        assert {r.headers.get("Authorization") for r in api.requests} == {"Bearer tok-123"}


def test_a_kubeflow_session_cookie_in_a_profile_namespace(bucket, s3_endpoint, tmp_path):
    cookie = tmp_path / "cookie"
    cookie.write_text("authservice_session=MTcwMDAwMDAwMHxk\n")
    with KfpApiStandIn(multi_user=True, namespaces=("team-a", "team-b"),
                       cookies={"authservice_session=MTcwMDAwMDAwMHxk": ["team-a"]}, login_redirect=True) as api:
        api.add_experiment("kubeml", namespace="team-a")
        config = _config(tmp_path, bucket, s3_endpoint, host=api.url, auth="cookie", cookie=f"file:{cookie}",
                         namespace="team-a")
        result = _invoke("run", "--config", str(config), "--env", "staging", "--target", "kubeflow", "--no-wait")
        assert result.exit_code == EXIT_OK, result.output
        (run,) = api.runs.values()
        assert run["namespace"] == "team-a"
        assert all("authservice_session=MTcwMDAwMDAwMHxk" in (r.headers.get("Cookie") or "") for r in api.requests)

        # The same cookie in another tenant's namespace: refused, and nothing is created there.
        result = _invoke("run", "--config", str(config), "--env", "staging", "--target", "kubeflow", "--no-wait",
                         "--namespace", "team-b", "--create-experiment")
        assert result.exit_code == EXIT_FAILED, result.output
        assert "refused the request in namespace team-b (403" in result.output
        assert len(api.runs) == 1 and [e["namespace"] for e in api.experiments.values()] == ["team-a"]


def test_the_pods_service_account_token_is_read_again_for_every_call(bucket, s3_endpoint, tmp_path):
    """``auth: service-account``: the projected token rotates; each call reads the file."""
    from kubeml.config import KubemlConfig
    from kubeml.pipelines import kubeflow

    token = tmp_path / "token"
    token.write_text("sa-token-1")
    with KfpApiStandIn(tokens={"sa-token-1": None, "sa-token-2": None}) as api:
        api.add_experiment("kubeml")
        cfg = KubemlConfig.model_validate(yaml.safe_load(_config(
            tmp_path, bucket, s3_endpoint, host=api.url, auth="service-account",
            service_account_token_path=str(token)).read_text())).environment("staging")
        session = kubeflow.connect(cfg.kubeflow)
        submitted = kubeflow.submit(cfg, run_id="kf-sa", code_version="c0ffee", session=session)
        token.write_text("sa-token-2")
        assert kubeflow.follow(session, submitted.kfp_run_id, stop=_set_event()).state == "PENDING"
        sent = [r.headers.get("Authorization") for r in api.requests]
        assert sent[0] == "Bearer sa-token-1" and sent[-1] == "Bearer sa-token-2", sent


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


# --- bad input: a clear error, and nothing created --------------------------------------------


def _refused(api: KfpApiStandIn, config: Path, *extra: str) -> Any:
    result = _invoke("run", "--config", str(config), "--env", "staging", "--target", "kubeflow", "--no-wait", *extra)
    assert not api.runs and not _posts(api), (api.runs, _posts(api))
    return result


def test_an_unreachable_host(api, bucket, s3_endpoint, tmp_path):
    from kubeml._proc import free_port

    host = f"http://127.0.0.1:{free_port()}"
    result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=host))
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"no answer from the KFP API at {host}" in result.output and "kubeflow.host" in result.output


def test_a_refused_token_is_401_and_a_missing_login_is_a_redirect(bucket, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "expired")
    with KfpApiStandIn(tokens={"good": None}) as api:
        result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=api.url, auth="token",
                                       token="env:KFP_TOKEN"))
        assert result.exit_code == EXIT_FAILED, result.output
        assert "refused the request (401" in result.output and "bearer token (env:KFP_TOKEN)" in result.output
    with KfpApiStandIn(cookies={"authservice_session=x": None}, login_redirect=True) as api:
        result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=api.url))
        assert result.exit_code == EXIT_FAILED, result.output
        assert "redirected to /dex/auth" in result.output and "kubeflow.auth" in result.output


def test_an_unknown_experiment_lists_the_ones_there_are(bucket, s3_endpoint, tmp_path):
    with KfpApiStandIn() as api:
        api.add_experiment("digits-nightly")
        result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=api.url, experiment="digits-nighty"))
        assert result.exit_code == EXIT_CONFIG, result.output
        assert "experiment 'digits-nighty' does not exist" in result.output
        assert "digits-nightly" in result.output and "--create-experiment" in result.output


def test_a_pipeline_root_the_cluster_cannot_write(api, bucket, s3_endpoint, tmp_path):
    result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=api.url, pipeline_root=f"file://{tmp_path}"))
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "is not storage the cluster can write" in result.output
    result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=api.url,
                                   pipeline_root="s3://kubeml-no-such-bucket/root"))
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "bucket kubeml-no-such-bucket does not exist" in result.output


def test_state_the_pods_could_not_share_is_refused(api, bucket, s3_endpoint, tmp_path):
    config = _config(tmp_path, bucket, s3_endpoint, host=api.url)
    body = yaml.safe_load(config.read_text())
    body["environments"]["staging"]["registry"] = {"tracking_uri": "sqlite:///.kubeml/mlflow.db"}
    config.write_text(yaml.safe_dump(body))
    result = _refused(api, config)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "each pipeline pod would have its own empty registry" in result.output


def test_a_pipeline_that_does_not_compile(api, bucket, s3_endpoint, tmp_path, monkeypatch):
    import kubeml.pipelines.training as training

    def not_a_pipeline(config_json: str, run_id: str) -> None:
        """A plain function: the compiler refuses it."""

    monkeypatch.setattr(training, "build_training_pipeline", lambda tasks=None: not_a_pipeline)
    result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=api.url))
    assert result.exit_code == EXIT_FAILED, result.output
    assert "does not compile" in result.output


def test_a_host_that_is_not_the_kfp_api(bucket, s3_endpoint, tmp_path):
    with KfpApiStandIn() as api:
        result = _refused(api, _config(tmp_path, bucket, s3_endpoint, host=f"{api.url}/wrong/prefix"))
        assert result.exit_code == EXIT_CONFIG, result.output
        assert "kubeflow.host must be the KFP API's base URL" in result.output


# --- schedules ---------------------------------------------------------------------------------


def test_a_schedule_for_retraining(api, bucket, s3_endpoint, tmp_path):
    config = _config(tmp_path, bucket, s3_endpoint, host=api.url)
    result = _invoke("pipeline", "schedule", "--cron", "30 3 * * MON-FRI", "--name", "digits-retrain",
                     "--config", str(config), "--env", "staging")
    assert result.exit_code == EXIT_OK, result.output
    (recurring,) = api.recurring_runs.values()
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 30 3 * * MON-FRI"
    assert recurring["no_catchup"] is True and recurring["max_concurrency"] == "1"
    assert recurring["mode"] == "ENABLE"
    # Every scheduled run gets a run id of its own from the scheduler.
    assert recurring["runtime_config"]["parameters"]["run_id"] == "digits-retrain-[[RunUUID]]"

    result = _invoke("pipeline", "schedule", "--cron", "61 3 * * *", "--config", str(config), "--env", "staging")
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "minute '61' is out of range 0-59" in result.output
    assert len(api.recurring_runs) == 1


# --- the stand-in checks what it is sent ------------------------------------------------------


def test_the_stand_in_refuses_what_the_api_models_refuse():
    assert model_errors({"display_name": "x", "namespace": "a"}, "V2beta1Experiment") == []
    assert model_errors({"display_name": "x", "nmespace": "a"}, "V2beta1Experiment")[0].startswith(
        "V2beta1Experiment: unknown field 'nmespace'")
    assert model_errors({"display_name": 3}, "V2beta1Run") == ["V2beta1Run.display_name: expected a string, got int"]
    assert model_errors({"mode": "SOMETIMES"}, "V2beta1RecurringRun")[0].startswith("V2beta1RecurringRun.mode:")
    assert model_errors({"runtime_config": {"parameters": {"a": 1}, "pipelineRoot": "s3://b"}}, "V2beta1Run") == []
