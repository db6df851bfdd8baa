"""The Kubeflow target's checks that need no server: schedules, the kubeflow config block,
and the environments a cluster could not run (tests/integration/test_kfp_submission.py
submits to a stand-in of the KFP API)."""

from __future__ import annotations

import pytest

from kubeml.config import KubemlConfig
from kubeml.errors import ConfigError
from kubeml.pipelines.kubeflow import check_cluster_ready, normalize_cron, pipeline_root


@pytest.mark.parametrize(("given", "sent"), [
    ("0 3 * * *", "0 0 3 * * *"),
    ("*/15 * * * *", "0 */15 * * * *"),
    ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),
    ("30 2 1,15 jan-jun MON-FRI", "0 30 2 1,15 jan-jun MON-FRI"),
    ("  0   3 * * * ", "0 0 3 * * *"),
    ("@daily", "@daily"),
    ("@every 6h30m", "@every 6h30m"),
])
def test_schedules_in_kfps_six_field_form(given: str, sent: str) -> None:
    assert normalize_cron(given) == sent


@pytest.mark.parametrize(("given", "says"), [
    ("61 * * * *", "minute '61' is out of range 0-59"),
    ("0 24 * * *", "hour '24' is out of range 0-23"),
    ("0 3 * * 7", "day of week '7' is out of range 0-6"),
    ("0 3 0 * *", "day of month '0' is out of range 1-31"),
    ("0 3 * * * * *", "give 5 fields"),
    ("0 3 * *", "give 5 fields"),
    ("? 3 * * *", "minute '?' uses ?, allowed only in the day fields"),
    ("0 5-3 * * *", "hour '5-3' is a range that ends before it starts"),
    ("*/0 * * * *", "has a step that is not a positive number"),
    ("0 3 * smarch *", "month 'smarch' is not a number"),
    ("@fortnightly", "give 5 fields"),
])
def test_a_bad_schedule_names_the_field(given: str, says: str) -> None:
    with pytest.raises(ConfigError, match="--cron") as info:
        normalize_cron(given)
    assert says in str(info.value)


def _env(**env):
    return KubemlConfig(environments={"prod": env}).environment("prod")


def test_the_kubeflow_block_is_checked_at_load_time() -> None:
    with pytest.raises(ConfigError, match="kubeflow.token: Value error, must be a reference"):
        _env(kubeflow={"auth": "token", "token": "eyJhbGciOi..."})
    with pytest.raises(ConfigError, match="auth: token needs token"):
        _env(kubeflow={"auth": "token"})
    with pytest.raises(ConfigError, match="kubeflow.auth: 'basic' is not allowed"):
        _env(kubeflow={"auth": "basic"})
    with pytest.raises(ConfigError, match="kubeflow.host: Value error, must be an http"):
        _env(kubeflow={"host": "kubeflow.example.com"})
    assert _env(kubeflow={"host": "https://kubeflow.example.com/pipeline/"}).kubeflow.host == \
        "https://kubeflow.example.com/pipeline"


def test_an_environment_the_pods_could_not_share_is_refused() -> None:
    with pytest.raises(ConfigError, match="the pipeline's pods cannot see a local store"):
        check_cluster_ready(_env())
    with pytest.raises(ConfigError, match="each pipeline pod would have its own empty registry"):
        check_cluster_ready(_env(artifact_store={"uri": "s3://ml/kubeml"}))
    check_cluster_ready(_env(artifact_store={"uri": "s3://ml/kubeml"},
                             registry={"tracking_uri": "http://mlflow.kubeml-system.svc:5000"}))


def test_a_pipeline_root_must_be_object_storage() -> None:
    with pytest.raises(ConfigError, match="pipeline_root is not set and the artifact store is local"):
        pipeline_root(_env())
    with pytest.raises(ConfigError, match="'/data/root' is not storage the cluster can write"):
        pipeline_root(_env(kubeflow={"pipeline_root": "/data/root"}))
    assert pipeline_root(_env(kubeflow={"pipeline_root": "gs://ml/root"})) == "gs://ml/root"
