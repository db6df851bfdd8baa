"""The CLI's own behaviour: exit codes, messages, registry commands (in-process, real MLflow on SQLite)."""

from pathlib import Path

from typer.testing import CliRunner

from kubeml.cli import EXIT_CONFIG, app
from kubeml.config import load_config
from kubeml.registry import Registry
from tests.conftest import write_config

runner = CliRunner()


def test_config_validate_and_show(project: Path):
    write_config(project, {"training": {"epochs": 3}}, staging={})
    r = runner.invoke(app, ["config", "validate"])
    assert r.exit_code == 0 and "valid" in r.output
    r = runner.invoke(app, ["config", "show", "--env", "staging"])
    assert r.exit_code == 0 and '"approval": "manual"' in r.output


def test_bad_config_exits_2_with_the_key(project: Path):
    write_config(project, {"gate": {"min_acc": 0.9}})
    r = runner.invoke(app, ["run"])
    assert r.exit_code == EXIT_CONFIG
    assert "environments.dev.gate.min_acc: unknown key" in r.output


def test_unsupported_target_is_refused_before_any_work(project: Path):
    r = runner.invoke(app, ["run", "--target", "mars"])
    assert r.exit_code == EXIT_CONFIG and "allowed values: local" in r.output
    assert not (project / ".kubeml" / "runs").exists()


def test_models_list_approve_reject(project: Path):
    write_config(project, {}, staging={})
    cfg = load_config("kubeml.yaml", "staging")
    reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
    reg.register(cfg.registry.model_name, "file:///x/bundle", metrics={"accuracy": 0.97},
                 tags={"dataset_version": "v-1"}, auto_approve=False)
    r = runner.invoke(app, ["models", "list", "--env", "staging"])
    assert r.exit_code == 0 and "pending" in r.output and "v-1" in r.output
    r = runner.invoke(app, ["models", "approve", "1", "--env", "staging"])
    assert r.exit_code == 0 and "version 1: approved" in r.output
    assert reg.get(cfg.registry.model_name, 1).approved
    r = runner.invoke(app, ["models", "reject", "1", "--env", "staging"])
    assert r.exit_code == 0 and reg.get(cfg.registry.model_name, 1).approval_status == "rejected"
    r = runner.invoke(app, ["models", "approve", "7", "--env", "staging"])
    assert r.exit_code == 1 and "version 7 is not registered" in r.output
