"""``kubeml train`` / ``kubeml tune`` are registered and validate their options before any work."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from kubeml.cli import app
from tests.conftest import write_config

runner = CliRunner()


def test_train_and_tune_are_top_level_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "train" in result.output and "tune" in result.output


def test_train_dry_run_prints_the_rayjob_for_the_kuberay_target(project):
    cfg = write_config(project, dev={
        "artifact_store": {"uri": "s3://ml-artifacts/kubeml"},
        "training": {"workers": 2, "launcher": {"node_group": "gpu-p4d", "gpus_per_worker": 8}},
    })
    # Ingest writes to S3 before the manifest is printed; a local store keeps this offline.
    cfg.write_text(cfg.read_text().replace("s3://ml-artifacts/kubeml", "file://.kubeml/artifacts"))

    result = runner.invoke(app, ["train", "--config", str(cfg), "--target", "kuberay", "--dry-run", "--run-id", "r1"])

    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output[result.output.index("apiVersion"):])
    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "kubeml-r1"


def test_bad_override_is_a_config_error(project):
    cfg = write_config(project)
    result = runner.invoke(app, ["train", "--config", str(cfg), "--precision", "fp16"])
    assert result.exit_code == 2
    assert "fp16" in result.output


def test_resume_of_an_unknown_run_says_so(project):
    cfg = write_config(project)
    result = runner.invoke(app, ["train", "--config", str(cfg), "--resume", "nope"])
    assert result.exit_code == 2
    assert "run 'nope' is not in" in result.output
