"""``kubeml serve status|stop`` through Typer's runner, against a real state dir."""

from __future__ import annotations

from typer.testing import CliRunner

from kubeml.cli.serve import app

from tests.unit.serving.test_serving_manager import write_stale_entry

runner = CliRunner()


def test_status_lists_dead_server_and_stop_removes_it(tmp_path):
    write_stale_entry(tmp_path, "ghost")
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ghost" in result.output and "dead" in result.output

    result = runner.invoke(app, ["stop", "ghost", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "stopped ghost" in result.output
    assert "no model servers" in runner.invoke(app, ["status", "--state-dir", str(tmp_path)]).output


def test_state_dir_defaults_to_kubeml_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEML_HOME", str(tmp_path))
    write_stale_entry(tmp_path / "serving", "ghost")
    assert "ghost" in runner.invoke(app, ["status"]).output
    assert runner.invoke(app, ["stop"]).exit_code == 0
    assert "no model servers" in runner.invoke(app, ["status"]).output


def test_stop_of_unknown_model_fails(tmp_path):
    result = runner.invoke(app, ["stop", "nope", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no model server named 'nope'" in result.output


def test_deploy_reports_errors_without_traceback(tmp_path):
    result = runner.invoke(
        app, ["deploy", str(tmp_path / "missing"), "--name", "digits", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 2  # a bad argument: usage, as everywhere in the CLI
    assert "does not exist" in result.output
