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


def test_each_step_gets_its_pod_settings_and_caching_in_the_ir(tmp_path) -> None:
    import yaml

    from kubeml.pipelines.kubeflow import compile_pipeline

    cfg = _env(kubeflow={"tasks": {
        "default": {"cpu": "250m", "memory": "512Mi"},
        "train": {"cpu": "8", "cpu_limit": "8", "memory": "60Gi", "gpu": 4,
                  "node_selector": {"eks.amazonaws.com/nodegroup": "p4d"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }})
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", kubeflow=cfg.kubeflow).read_text()))
    spec, platform = docs[0], docs[1]
    executors = spec["deploymentSpec"]["executors"]
    tasks = {**spec["root"]["dag"]["tasks"], **spec["components"]["comp-condition-1"]["dag"]["tasks"]}

    def resources(stage: str) -> dict:
        return executors[spec["components"][tasks[stage]["componentRef"]["name"]]["executorLabel"]]["container"][
            "resources"]

    train = resources("train")
    assert train["cpuRequest"] == 8 and train["cpuLimit"] == 8
    assert train["memoryRequest"] == 64.424509440 and train["accelerator"]["resourceCount"] == "4"
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu"
    ingest = resources("ingest")
    assert ingest["cpuRequest"] == 0.25 and ingest["memoryLimit"] == 0.536870912
    # Placement is KFP's Kubernetes platform spec, per executor.
    train_exec = spec["components"][tasks["train"]["componentRef"]["name"]]["executorLabel"]
    placed = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][train_exec]
    assert placed["nodeSelector"]["labels"] == {"eks.amazonaws.com/nodegroup": "p4d"}
    assert placed["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Caching: pure stages may be reused, those that act on the world never are.
    cached = {stage: tasks[stage].get("cachingOptions", {}).get("enableCache", False) for stage in tasks
              if stage != "condition-1"}
    assert cached == {"configure": True, "ingest": True, "validate": True, "evaluate": True, "gate": True,
                      "train": False, "register": False, "deploy": False}


def test_a_task_that_asks_for_more_than_the_default_is_not_capped_by_it() -> None:
    kubeflow = _env(kubeflow={"tasks": {"default": {"cpu": "500m", "cpu_limit": "2", "memory": "1Gi"},
                                        "train": {"cpu": "8"}}}).kubeflow
    train = kubeflow.task("train")
    assert (train.cpu, train.cpu_limit, train.memory) == ("8", None, "1Gi")
    assert kubeflow.task("gate").cpu_limit == "2"
    with pytest.raises(ConfigError, match="tasks.train over tasks.default: Value error, cpu_limit 250m is below cpu 500m"):
        _env(kubeflow={"tasks": {"default": {"cpu": "500m"}, "train": {"cpu_limit": "250m"}}})
    with pytest.raises(ConfigError, match="memory_limit 4Gi is below memory 8Gi"):
        _env(kubeflow={"tasks": {"train": {"memory": "8Gi", "memory_limit": "4Gi"}}})
