from pathlib import Path

import pytest

from kubeml.config import EnvironmentConfig, load_config
from kubeml.errors import ConfigError
from tests.conftest import write_config


def test_defaults_without_a_file_are_local_and_absolute(project: Path):
    cfg = load_config()
    assert cfg.name == "dev"
    assert cfg.approval == "auto"
    assert cfg.artifact_store.uri == f"file://{project / '.kubeml' / 'artifacts'}"
    assert cfg.registry.tracking_uri == f"sqlite:///{project / '.kubeml' / 'mlflow.db'}"


def test_staging_and_prod_wait_for_approval_unless_told_otherwise(project: Path):
    write_config(project, staging={}, prod={"approval": "auto"})
    assert load_config("kubeml.yaml", "staging").approval == "manual"
    assert load_config("kubeml.yaml", "prod").approval == "auto"


def test_relative_paths_resolve_against_the_config_file_not_the_cwd(project: Path, monkeypatch):
    sub = project / "conf"
    sub.mkdir()
    write_config(sub, {"artifact_store": {"uri": "file://store"}})
    monkeypatch.chdir("/")
    cfg = load_config(sub / "kubeml.yaml", "dev")
    assert cfg.artifact_store.uri == f"file://{sub / 'store'}"


def test_unknown_key_is_named_with_the_allowed_keys(project: Path):
    write_config(project, {"training": {"epoch": 3}})
    with pytest.raises(ConfigError) as e:
        load_config("kubeml.yaml")
    msg = str(e.value)
    assert "environments.dev.training.epoch: unknown key" in msg
    assert "epochs" in msg and "batch_size" in msg


def test_bad_literal_lists_allowed_values(project: Path):
    write_config(project, {"approval": "sometimes"})
    with pytest.raises(ConfigError, match=r"approval: 'sometimes' is not allowed; allowed values: 'auto' or 'manual'"):
        load_config("kubeml.yaml")


def test_out_of_range_value_is_rejected_with_the_key(project: Path):
    write_config(project, {"gate": {"min_accuracy": 1.5}})
    with pytest.raises(ConfigError, match=r"environments\.dev\.gate\.min_accuracy"):
        load_config("kubeml.yaml")


def test_error_in_another_environment_fails_the_load(project: Path):
    write_config(project, {}, prod={"serving": {"http_port": 70000}})
    with pytest.raises(ConfigError, match=r"environments\.prod\.serving\.http_port"):
        load_config("kubeml.yaml", "dev")


def test_unknown_environment_is_rejected(project: Path):
    write_config(project, {})
    with pytest.raises(ConfigError, match="allowed values: dev, staging, prod"):
        load_config("kubeml.yaml", "qa")
    (project / "kubeml.yaml").write_text("environments:\n  qa: {}\n")
    with pytest.raises(ConfigError, match="environments.qa"):
        load_config("kubeml.yaml")


def test_bad_artifact_scheme_says_which_are_allowed(project: Path):
    write_config(project, {"artifact_store": {"uri": "gs://bucket"}})
    with pytest.raises(ConfigError, match="allowed schemes: file, s3"):
        load_config("kubeml.yaml")


def test_not_yaml_and_missing_file_are_clear(project: Path):
    (project / "kubeml.yaml").write_text("environments: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("kubeml.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(project / "nope.yaml")


def test_config_round_trips_through_json_for_pipeline_stages(project: Path):
    cfg = load_config()
    assert EnvironmentConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_repository_kubeml_yaml_is_valid():
    root = Path(__file__).resolve().parents[2]
    for env in ("dev", "staging", "prod"):
        cfg = load_config(root / "kubeml.yaml", env)
        assert cfg.name == env


def test_serving_batching_and_timeout_keys_are_optional_and_passed_as_set(project: Path):
    write_config(project, {"serving": {"batch_max_size": 32, "request_timeout_s": 2}}, staging={})
    cfg = load_config("kubeml.yaml", "dev")
    assert (cfg.serving.batch_max_size, cfg.serving.batch_max_latency_ms, cfg.serving.request_timeout_s) == (32, None, 2.0)
    assert cfg.serving.server_options() == {"batch_max_size": 32, "request_timeout_s": 2.0}
    assert load_config("kubeml.yaml", "staging").serving.server_options() == {}  # server defaults
    # Stages get the config as JSON: the keys survive the round trip.
    assert EnvironmentConfig.model_validate_json(cfg.model_dump_json()).serving == cfg.serving


@pytest.mark.parametrize(
    "serving, message",
    [
        ({"batch_size": 8}, r"environments\.dev\.serving\.batch_size: unknown key; allowed keys: .*batch_max_latency_ms, batch_max_size"),
        ({"batch_max_size": 0}, r"serving\.batch_max_size: Input should be greater than or equal to 1"),
        ({"batch_max_size": "eight"}, r"serving\.batch_max_size: Input should be a valid integer \(got 'eight'\)"),
        ({"batch_max_size": True}, r"serving\.batch_max_size: Input should be a valid integer"),
        ({"batch_max_size": 2.5}, r"serving\.batch_max_size: Input should be a valid integer"),
        ({"batch_max_size": 8, "batch_max_latency_ms": -1}, r"serving\.batch_max_latency_ms: Input should be greater than or equal to 0"),
        ({"batch_max_size": 8, "batch_max_latency_ms": ".inf"}, r"serving\.batch_max_latency_ms"),
        ({"request_timeout_s": -5}, r"serving\.request_timeout_s: Input should be greater than or equal to 0"),
        ({"batch_max_latency_ms": 5}, r"serving: .*batch_max_latency_ms needs batch_max_size"),
        ({"batch_max_size": 8, "batch_max_latency_ms": 2000, "request_timeout_s": 1},
         r"batch_max_latency_ms 2000 is not below the request timeout of 1 s"),
        ({"batch_max_size": 8, "batch_max_latency_ms": 30000}, r"is not below the request timeout of 30 s"),
    ],
)
def test_invalid_serving_batching_values_get_a_clear_error_naming_the_key(project: Path, serving, message):
    if serving.get("batch_max_latency_ms") == ".inf":
        (project / "kubeml.yaml").write_text(
            "project: test\nenvironments:\n  dev:\n    serving:\n      batch_max_size: 8\n      batch_max_latency_ms: .inf\n"
        )
    else:
        write_config(project, {"serving": serving})
    with pytest.raises(ConfigError, match=message):
        load_config("kubeml.yaml")
