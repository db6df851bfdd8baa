"""The stage runner: which failures are retried, and how an orchestrator retry is answered."""

from __future__ import annotations

import pickle

import pytest

from kubeml.config import EnvironmentConfig
from kubeml.errors import ArtifactError, ConfigError, StageFailed, is_retryable
from kubeml.pipelines.stages._common import RetryPolicy, open_stage, run_stage


def _config_json(tmp_path) -> str:
    return EnvironmentConfig(artifact_store={"uri": f"file://{tmp_path}/artifacts"}).model_dump_json()


class Flaky:
    """A stage body that raises the given errors in turn, then returns ``"done"``."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.attempts: list[int] = []

    def __call__(self, rec, attempt: int) -> str:
        self.attempts.append(attempt)
        if self.errors:
            raise self.errors.pop(0)
        rec.message = "ok"
        return "done"


def test_a_retryable_error_is_retried_after_the_backoff_and_the_attempt_recorded(tmp_path):
    ctx = open_stage(_config_json(tmp_path), "r1", "a")
    body, slept = Flaky(ArtifactError("S3 throttled"), ArtifactError("S3 throttled")), []
    policy = RetryPolicy(retries=2, backoff_s=60, factor=2)
    assert run_stage("train", ctx, body, policy=policy, sleep=slept.append) == "done"
    assert body.attempts == [1, 2, 3] and slept == [60, 120]
    rec = ctx.ledger.read("train")
    assert rec.status == "succeeded" and rec.attempt == 3


def test_a_configuration_error_fails_at_once_without_a_retry(tmp_path):
    ctx = open_stage(_config_json(tmp_path), "r1", "a")
    body, slept = Flaky(ConfigError("training.target kuberay needs s3://")), []
    with pytest.raises(ConfigError, match="needs s3://"):
        run_stage("train", ctx, body, policy=RetryPolicy(retries=2), sleep=slept.append)
    assert body.attempts == [1] and slept == []
    rec = ctx.ledger.read("train")
    assert rec.status == "failed" and rec.retryable is False and "needs s3://" in rec.message


def test_an_unexpected_exception_is_a_bug_and_is_not_retried(tmp_path):
    ctx = open_stage(_config_json(tmp_path), "r1")
    body = Flaky(KeyError("x"))
    with pytest.raises(KeyError):
        run_stage("ingest", ctx, body, policy=RetryPolicy(retries=2), sleep=lambda s: None)
    assert body.attempts == [1]


def test_an_orchestrator_retry_after_a_permanent_failure_fails_at_once_with_its_error(tmp_path):
    config_json = _config_json(tmp_path)
    with pytest.raises(ConfigError):
        run_stage("train", open_stage(config_json, "r1", "a"), Flaky(ConfigError("bad key training.x")))
    # KFP retries the step: same run, same inputs. The work is not repeated.
    again = Flaky()
    with pytest.raises(StageFailed, match="bad key training.x") as info:
        run_stage("train", open_stage(config_json, "r1", "a"), again)
    assert again.attempts == [] and not is_retryable(info.value)
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args
    # Other inputs (a fixed dataset version) run the stage again.
    assert run_stage("train", open_stage(config_json, "r1", "b"), Flaky()) == "done"


def test_retries_that_ran_out_are_not_repeated_by_an_orchestrator_retry(tmp_path):
    config_json = _config_json(tmp_path)
    ctx = open_stage(config_json, "r1", "a")
    with pytest.raises(ArtifactError):
        run_stage("train", ctx, Flaky(ArtifactError("down"), ArtifactError("down")),
                  policy=RetryPolicy(retries=1, backoff_s=0), sleep=lambda s: None)
    assert ctx.ledger.read("train").retryable is False
    with pytest.raises(StageFailed, match="down"):
        run_stage("train", open_stage(config_json, "r1", "a"), Flaky())


def test_a_step_lost_while_running_is_run_again_by_an_orchestrator_retry(tmp_path):
    """A pod killed mid-stage leaves its record 'running': the retry does the work (adopting its job)."""
    config_json = _config_json(tmp_path)
    ctx = open_stage(config_json, "r1", "a")
    with ctx.ledger.stage("train", inputs_sha256=ctx.inputs_sha256) as rec:
        ctx.ledger.write(rec)  # what a killed pod leaves behind
        body = Flaky()
        assert run_stage("train", open_stage(config_json, "r1", "a"), body) == "done"
    assert body.attempts == [1]


def test_retry_policy_refuses_nonsense_with_the_allowed_ranges():
    with pytest.raises(ValueError, match="retries >= 0"):
        RetryPolicy(retries=-1)


def test_a_run_whose_bundle_is_registered_never_trains_over_it(tmp_path):
    from kubeml.pipelines.stages import train_stage
    from kubeml.registry import Registry

    cfg = EnvironmentConfig(artifact_store={"uri": f"file://{tmp_path}/artifacts"},
                            registry={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    store = cfg.artifact_store.open()
    Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri).register(
        cfg.registry.model_name, store.url("models/r1/bundle"), metrics={"accuracy": 0.99}, auto_approve=True)
    with pytest.raises(ConfigError, match="already produced .* version 1"):
        train_stage(cfg.model_dump_json(), "r1", "digits", "v-1")
