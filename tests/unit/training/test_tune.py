"""`run_tune`: Ray Tune + Optuna TPE + ASHA on a small digits subset, trials logged to MLflow."""

from __future__ import annotations

import math

import pytest

from kubeml.artifacts import open_store
from kubeml.config import EnvironmentConfig
from kubeml.data import ingest

pytestmark = pytest.mark.slow


def test_tune_evaluates_the_default_finds_no_worse_and_logs_every_trial(tmp_path):
    from mlflow import MlflowClient

    from kubeml.training.tune import TuneOptions, run_tune

    cfg = EnvironmentConfig.model_validate(
        {"data": {"max_rows": 300}, "training": {"epochs": 3}, "artifact_store": {"uri": "file://artifacts"}}
    ).resolved(tmp_path)
    store = open_store(cfg.artifact_store.uri)
    m = ingest(store, cfg.data)
    opts = TuneOptions(trials=3, time_budget_s=600, max_concurrent=2)
    result = run_tune(cfg, store, dataset=m.name, dataset_version=m.version, run_id="tune-t", options=opts)

    assert len(result.trials) == 3
    assert not math.isnan(result.default_val_accuracy), "the default config is always one of the trials"
    assert result.best_val_accuracy >= result.default_val_accuracy
    assert result.best_val_accuracy == max(t["val_accuracy"] for t in result.trials)
    assert store.exists("runs/tune-t/tune/result.json")

    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri)
    exp = client.get_experiment_by_name(f"kubeml/{cfg.registry.model_name}/tune")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(result.mlflow_run_id)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(result.best_val_accuracy)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.mlflow_run_id]
    assert len(children) == 3
