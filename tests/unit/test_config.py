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
