"""Hyperparameter search: Ray Tune with Optuna's TPE sampler and ASHA early stopping.

Each trial trains one model in its own process with the same :class:`~kubeml.training.loop.Stepper`
the Ray Train path uses (one worker per trial: on a small machine, parallel trials use the
cores better than data parallelism inside a trial). A trial reports validation accuracy
every epoch; ASHA stops the weak ones at the rungs, and TPE proposes the next
configurations from the finished ones. The environment's current configuration is always
trial 0, so the best configuration found is at least as good as the default on the same
validation split.

Every trial and the best configuration are recorded in MLflow (the environment's
``registry.tracking_uri``): a parent run ``tune RUN_ID`` with one nested run per trial.
"""

from __future__ import annotations

import json
import math

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeml.artifacts import ArtifactStore
from kubeml.config import EnvironmentConfig
from kubeml.errors import ConfigError, KubemlError

__all__ = ["TuneOptions", "TuneResult", "run_tune", "train_trial"]

#: Hyperparameters searched, with the range each is drawn from.
SEARCHED = ("learning_rate", "batch_size", "weight_decay", "warmup_fraction")


@dataclass(frozen=True)
class TuneOptions:
    trials: int = 12
    """Trials in total, the default configuration included."""
    time_budget_s: float = 600.0
    """No new trial starts after this many seconds (the issue's 10-minute budget on a laptop)."""
    max_concurrent: int = 2
    """Trials at once; each takes one CPU."""
    grace_epochs: int = 2
    """ASHA's first rung: every trial runs at least this many epochs before it can be stopped."""
    reduction_factor: int = 3
    """ASHA keeps the top 1/reduction_factor of the trials at each rung."""
    seed: int = 0
    """Seed of the TPE sampler."""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"tune trials must be >= 1, got {self.trials}")
        if self.max_concurrent < 1:
            raise ConfigError(f"tune max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.grace_epochs < 1 or self.reduction_factor < 2:
            raise ConfigError("tune grace_epochs must be >= 1 and reduction_factor >= 2")


@dataclass(frozen=True)
class TuneResult:
    run_id: str
    best_config: dict[str, Any]
    best_val_accuracy: float
    default_val_accuracy: float
    """Validation accuracy of trial 0, the environment's configuration as given."""
    trials: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    mlflow_run_id: str = ""
    wall_s: float = 0.0


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune trainable: one model, one process, validation metrics each epoch."""
    import numpy as np
    import ray.tune
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from kubeml.artifacts import open_store
    from kubeml.data import load_dataset
    from kubeml.training.loop import Stepper, evaluate, make_optimizer, make_scheduler, windows
    from kubeml.models import build_model
    from kubeml.training.worker import _seed_everything, _split_validation

    tc = {**config["training"], **{k: config[k] for k in SEARCHED}}
    seed = config["seed"]
    _seed_everything(seed)
    torch.set_num_threads(1)
    store = open_store(config["store_uri"], endpoint_url=config.get("endpoint_url"),
                       sse_kms_key_id=config.get("sse_kms_key_id"))
    x, y = load_dataset(store, config["dataset"], config["dataset_version"]).train()
    # Always validate, even when the training config does not: the search needs a score.
    x, y, xv, yv = _split_validation(x, y, tc["validation_fraction"] or 0.1, seed)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=int(tc["batch_size"]),
                        shuffle=True, generator=g)
    model = build_model(tc["model"], **tc.get("model_kwargs", {}))
    device = torch.device("cpu")
    opt = make_optimizer(model, learning_rate=tc["learning_rate"], weight_decay=tc["weight_decay"])
    k = tc["grad_accum_steps"]
    sched = make_scheduler(opt, kind=tc["lr_schedule"], total_steps=tc["epochs"] * math.ceil(len(loader) / k),
                           warmup_fraction=tc["warmup_fraction"], min_lr_ratio=tc["min_lr_ratio"])
    stepper = Stepper(model, opt, precision="bf16" if tc["precision"] == "bf16" else "fp32", device=device,
                      scheduler=sched, grad_clip_norm=tc["grad_clip_norm"])
    xv_t, yv_t = torch.from_numpy(xv), torch.from_numpy(yv)
    for epoch in range(tc["epochs"]):
        model.train()
        losses = [stepper.step(w).loss for w in windows(loader, k)]
        val_loss, val_acc = evaluate(model, xv_t, yv_t, device=device)
        ray.tune.report({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_loss": val_loss, "val_accuracy": val_acc})


def _space(opts: TuneOptions | None = None) -> dict[str, Any]:
    from ray import tune

    return {
        "learning_rate": tune.loguniform(3e-4, 2e-2),
        "batch_size": tune.choice([16, 32, 64, 128]),
        "weight_decay": tune.loguniform(1e-6, 1e-2),
        "warmup_fraction": tune.uniform(0.0, 0.3),
    }


def run_tune(
    cfg: EnvironmentConfig,
    store: ArtifactStore,
    *,
    dataset: str,
    dataset_version: str,
    run_id: str,
    options: TuneOptions = TuneOptions(),
) -> TuneResult:
    """Search, log every trial and the best configuration to MLflow, and return the outcome."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from kubeml.training.fit import ensure_ray

    t0 = time.perf_counter()
    tc = cfg.training
    if tc.precision == "fp16":
        raise ConfigError("kubeml tune runs trials on CPU; use precision fp32 or bf16")
    ensure_ray(cfg)
    default = {k: getattr(tc, k) for k in SEARCHED}
    searcher = OptunaSearch(metric="val_accuracy", mode="max", points_to_evaluate=[default], seed=options.seed)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=tc.epochs, grace_period=min(options.grace_epochs, tc.epochs),
                              reduction_factor=options.reduction_factor)
    param_space = {
        **_space(options),
        "training": json.loads(tc.model_dump_json()),
        "seed": cfg.data.seed,
        "store_uri": store.uri,
        "endpoint_url": getattr(store, "endpoint_url", None),
        "sse_kms_key_id": getattr(store, "sse_kms_key_id", None),
        "dataset": dataset,
        "dataset_version": dataset_version,
    }
    storage = Path(cfg.home) / "tune"
    storage.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        tune.with_resources(train_trial, {"cpu": 1}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", search_alg=ConcurrencyLimiter(searcher, max_concurrent=options.max_concurrent),
            scheduler=scheduler, num_samples=options.trials, time_budget_s=options.time_budget_s,
        ),
        run_config=tune.RunConfig(name=run_id, storage_path=str(storage), verbose=0),
    )
    try:
        grid = tuner.fit()
    except Exception as exc:
        raise KubemlError(f"tuning run {run_id} failed: {exc}") from exc
    trials = []
    for r in grid:
        if r.metrics is None or "val_accuracy" not in r.metrics:
            continue
        history = r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else [r.metrics]
        trials.append({
            "trial_id": str(r.metrics.get("trial_id", "")),
            "config": {k: r.config[k] for k in SEARCHED},
            "val_accuracy": float(max(h["val_accuracy"] for h in history)),
            "val_loss": float(min(h["val_loss"] for h in history)),
            "epochs": int(r.metrics.get("epoch", 0)),
            "history": [{k: float(h[k]) for k in ("epoch", "loss", "val_loss", "val_accuracy")} for h in history],
            "error": str(r.error) if r.error else "",
        })
    if not trials:
        raise KubemlError(f"tuning run {run_id}: no trial reported a result (see {storage / run_id})")
    trials.sort(key=lambda t: (-t["val_accuracy"], t["val_loss"]))
    default_trial = next((t for t in trials if all(
        math.isclose(float(t["config"][k]), float(default[k]), rel_tol=1e-9) for k in SEARCHED)), None)
    best = trials[0]
    result = TuneResult(
        run_id=run_id, best_config=best["config"], best_val_accuracy=best["val_accuracy"],
        default_val_accuracy=default_trial["val_accuracy"] if default_trial else float("nan"),
        trials=tuple(trials), wall_s=time.perf_counter() - t0,
    )
    mlflow_run = _log_to_mlflow(cfg, result, options)
    store.put_text(f"runs/{run_id}/tune/result.json", json.dumps({**result.__dict__, "mlflow_run_id": mlflow_run,
                                                                   "trials": list(result.trials)}, indent=2))
    return TuneResult(**{**result.__dict__, "mlflow_run_id": mlflow_run})


def _log_to_mlflow(cfg: EnvironmentConfig, result: TuneResult, options: TuneOptions) -> str:
    from mlflow import MlflowClient

    from kubeml.errors import RegistryError

    uri = cfg.registry.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    name = f"kubeml/{cfg.registry.model_name}/tune"
    try:
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            name, artifact_location=f"{cfg.artifact_store.uri.rstrip('/')}/mlflow/{name}")
        parent = client.create_run(exp_id, run_name=f"tune {result.run_id}", tags={"kubeml.run_id": result.run_id})
        pid = parent.info.run_id
        for k, v in {"trials": options.trials, "time_budget_s": options.time_budget_s, "search": "optuna-tpe",
                     "scheduler": "asha", "model": cfg.training.model, "max_epochs": cfg.training.epochs}.items():
            client.log_param(pid, k, str(v))
        for k, v in result.best_config.items():
            client.log_param(pid, f"best.{k}", str(v))
        client.log_metric(pid, "best_val_accuracy", result.best_val_accuracy)
        if not math.isnan(result.default_val_accuracy):
            client.log_metric(pid, "default_val_accuracy", result.default_val_accuracy)
        client.log_text(pid, json.dumps(result.best_config, indent=2), "best_config.json")
        for t in result.trials:
            child = client.create_run(exp_id, run_name=f"trial {t['trial_id']}",
                                      tags={"mlflow.parentRunId": pid, "kubeml.run_id": result.run_id,
                                            "trial_id": t["trial_id"], "error": t["error"]})
            cid = child.info.run_id
            for k, v in t["config"].items():
                client.log_param(cid, k, str(v))
            for h in t["history"]:
                for k in ("loss", "val_loss", "val_accuracy"):
                    client.log_metric(cid, k, h[k], step=int(h["epoch"]))
            client.set_terminated(cid)
        client.set_terminated(pid)
    except Exception as exc:  # MLflow raises MlflowException and sqlalchemy errors alike
        raise RegistryError(f"logging tuning run {result.run_id} to MLflow at {uri} failed: {exc}") from exc
    return pid



