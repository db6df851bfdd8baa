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


def test_serve_deploy_refuses_a_batch_latency_without_a_batch_size_before_starting(project: Path):
    from tests.unit.serving.conftest import write_digits_bundle

    bundle = write_digits_bundle(project / "digits")
    deploy = ["serve", "deploy", str(bundle), "--name", "digits", "--state-dir", str(project / "state")]
    r = runner.invoke(app, [*deploy, "--batch-max-latency-ms", "5"])
    assert r.exit_code == 2  # usage: flags that contradict each other, like a flag out of range below
    assert "--batch-max-latency-ms needs --batch-max-size" in r.output
    r = runner.invoke(app, [*deploy, "--batch-max-size", "0"])
    assert r.exit_code == 2 and "--batch-max-size" in r.output  # a usage error, from the flag's range
    r = runner.invoke(app, [*deploy, "--batch-max-size", "4", "--batch-max-latency-ms", "3000", "--request-timeout-s", "2"])
    assert r.exit_code == 2 and "is not below the request timeout of 2 s" in r.output
    assert not (project / "state").exists()  # nothing started


def test_serve_deploy_starts_the_server_with_the_batching_and_timeout_flags(project: Path):
    import requests

    from tests.conftest import free_port
    from tests.unit.serving.conftest import write_digits_bundle

    bundle = write_digits_bundle(project / "digits")
    port = free_port()
    state = ["--state-dir", str(project / "state")]
    try:
        r = runner.invoke(app, ["serve", "deploy", str(bundle), "--name", "digits", "--port", str(port), *state,
                                "--batch-max-size", "4", "--batch-max-latency-ms", "1", "--request-timeout-s", "3"])  # fmt: skip
        assert r.exit_code == 0, r.output
        pid = int(r.output.split("(pid ")[1].split(")")[0])
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        for flag, value in (("--batch-max-size", "4"), ("--batch-max-latency-ms", "1.0"), ("--request-timeout-s", "3.0")):
            assert args[args.index(flag) + 1] == value, args
        answer = requests.post(f"http://127.0.0.1:{port}/v1/models/digits:predict", json={"instances": [[0.0] * 64]}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    finally:
        runner.invoke(app, ["serve", "stop", *state])
