"""``kubeml train`` and ``kubeml tune``: top-level commands added through ``register(app)``.

``kubeml train`` ingests the configured data set, trains on the environment's target and
shows a progress bar (read from the run's ``progress.json``, so it works the same for a
local run and for one whose workers write to S3) and a final table. ``--resume RUN``
continues an interrupted run with the configuration and data version it started with.

``--target kuberay|sagemaker`` (default: ``training.target`` of the environment) creates a
KubeRay ``RayJob`` or an ACK SageMaker ``TrainingJob`` through
:func:`kubeml.training.launchers.train_on_cluster`, the same code the pipeline's train step
runs, and follows its status until it ends; ``--dry-run`` prints the manifest instead.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kubeml.cli._common import (
    EXIT_CONFIG,
    ConfigOpt,
    EnvOpt,
    console,
    fail,
    load_env,
    print_table,
)
from kubeml.config import EnvironmentConfig
from kubeml.errors import KubemlError

__all__ = ["register"]

TARGETS = ("local", "kuberay", "sagemaker")


def _new_run_id(prefix: str = "train") -> str:
    import secrets
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime(f"{prefix}-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _with_overrides(cfg: EnvironmentConfig, **overrides: Any) -> EnvironmentConfig:
    from pydantic import ValidationError

    from kubeml.config import TrainingConfig

    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return cfg
    try:
        training = TrainingConfig.model_validate({**cfg.training.model_dump(), **given})
    except ValidationError as exc:
        raise fail(f"invalid option: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", EXIT_CONFIG) from None
    return cfg.model_copy(update={"training": training})


def _follow(store, run_id: str, worker: threading.Thread) -> None:
    from kubeml.training.fit import read_progress

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting workers", total=None, detail="")
        while worker.is_alive():
            p = read_progress(store, run_id)
            if p:
                progress.update(
                    task, description=f"epoch {p['epoch']}/{p['epochs']}", total=p["total_steps"], completed=p["step"],
                    detail=f"loss {p['loss']:.4f} · {p['samples_per_s']:.0f} samples/s · lr {p['lr']:.2e}",
                )
            worker.join(0.25)
        p = read_progress(store, run_id)
        if p:
            progress.update(task, total=p["total_steps"], completed=p["step"])


def _summary_table(result, test_accuracy: float | None) -> Table:
    last = result.history[-1] if result.history else {}
    t = Table(title=f"training run {result.run_id}", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("epochs", f"{result.epochs}" + (" (stopped early)" if result.stopped_early else ""))
    t.add_row("train loss", f"{last.get('loss', float('nan')):.4f}")
    t.add_row("train accuracy", f"{last.get('train_accuracy', float('nan')):.4f}")
    if "val_accuracy" in last:
        t.add_row("validation accuracy", f"{last['val_accuracy']:.4f}")
    if test_accuracy is not None:
        t.add_row("test accuracy", f"{test_accuracy:.4f}")
    t.add_row("throughput", f"{last.get('samples_per_s', float('nan')):.0f} samples/s (last epoch)")
    t.add_row("time to first step", f"{result.time_to_first_step_s:.1f} s")
    t.add_row("wall time", f"{result.wall_s:.1f} s")
    t.add_row("worker-group starts", str(len(result.attempts)))
    t.add_row("bundle", result.bundle_key)
    t.add_row("final checkpoint", result.checkpoint_uri)
    t.add_row("best checkpoint", result.best_checkpoint_uri)
    return t


def _test_accuracy(cfg: EnvironmentConfig, store, result, dataset: str, version: str) -> float:
    from kubeml.bundle import load_bundle
    from kubeml.data import load_dataset
    from kubeml.evaluation import evaluate_model

    local = store.local_path(result.bundle_key)
    if local is None:
        local = store.get_dir(result.bundle_key, Path(cfg.home) / "cache" / "bundles" / result.run_id)
    model, spec = load_bundle(local)
    x, y = load_dataset(store, dataset, version).test()
    return evaluate_model(model, x, y, num_classes=len(spec.classes)).accuracy


def _train_local(cfg: EnvironmentConfig, store, run_id: str, dataset: str, version: str, resume: bool | None):
    from kubeml.training.fit import ensure_ray, fit

    ensure_ray(cfg)  # in the main thread: ray.init installs signal handlers
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = fit(cfg, store, dataset=dataset, dataset_version=version, run_id=run_id, resume=resume)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"fit-{run_id}", daemon=True)
    worker.start()
    _follow(store, run_id, worker)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def train(
    config: ConfigOpt = None,
    env: EnvOpt = None,
    target: Annotated[str | None, typer.Option(help=f"Where to train: {', '.join(TARGETS)} (default: training.target).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Run id (default: generated).")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue this interrupted run from its last checkpoint.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override training.epochs.")] = None,
    workers: Annotated[int | None, typer.Option(help="Override training.workers.")] = None,
    precision: Annotated[str | None, typer.Option(help="Override training.precision: fp32, bf16, fp16.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Cluster targets: print the job manifest, submit nothing.")] = False,
    timeout: Annotated[float | None, typer.Option(
        help="Cluster targets: seconds to follow the job before giving up; it keeps running "
             "(default: training.launcher.wait_timeout_s).")] = None,
) -> None:
    """Train a model with Ray Train (locally, as a KubeRay RayJob, or on SageMaker) and show the result."""

    cfg = _with_overrides(load_env(config, env), epochs=epochs, workers=workers, precision=precision)
    target = target or cfg.training.target
    if target not in TARGETS:
        raise fail(f"--target {target!r} is not supported; allowed values: {', '.join(TARGETS)}", EXIT_CONFIG)
    store = cfg.artifact_store.open()
    try:
        if resume:
            from kubeml.training.fit import run_spec_key

            try:
                spec = json.loads(store.get_text(run_spec_key(resume)))
            except KubemlError:
                raise fail(f"run {resume!r} is not in {store.uri}; list runs under {store.uri}/runs", EXIT_CONFIG) from None
            # Continue exactly: the configuration and data version the run started with.
            cfg = EnvironmentConfig.model_validate(spec["config"])
            run, dataset, version = resume, spec["dataset"], spec["dataset_version"]
        else:
            from kubeml.data import ingest

            m = ingest(store, cfg.data)
            run, dataset, version = run_id or _new_run_id(), m.name, m.version
        if target != "local":
            _train_cluster(cfg, store, target, run, dataset, version, dry_run=dry_run, timeout=timeout,
                           resume=bool(resume))
            return
        console.print(f"kubeml train [bold]{run}[/bold] · {cfg.training.model} · {cfg.training.workers} workers · "
                      f"{cfg.training.precision} · data {dataset}@{version}")
        result = _train_local(cfg, store, run, dataset, version, True if resume else None)
        accuracy = _test_accuracy(cfg, store, result, dataset, version)
    except KubemlError as exc:
        raise fail(exc) from None
    print_table(_summary_table(result, accuracy))


def _train_cluster(cfg, store, target: str, run: str, dataset: str, version: str, *, dry_run: bool,
                   timeout: float | None, resume: bool) -> None:
    """Build the job; with ``dry_run`` print it, else submit it and follow it to the end."""
    import yaml

    from kubeml.training.launchers import build_manifest, cancel_on_sigterm, train_on_cluster

    manifest, opts = build_manifest(cfg, target, run_id=run, dataset=dataset, dataset_version=version, resume=resume)
    if dry_run:
        console.print(yaml.safe_dump(manifest, sort_keys=False), highlight=False, markup=False)
        return
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    console.print(f"kubeml train [bold]{run}[/bold] · {kind} {opts.namespace}/{name} · data {dataset}@{version}")
    try:
        # SIGTERM (a stopped CI job, a terminated pod) deletes the job; Ctrl-C only stops following.
        with cancel_on_sigterm() as stop:
            result = train_on_cluster(cfg, store, target=target, run_id=run, dataset=dataset, dataset_version=version,
                                      resume=resume, timeout_s=timeout, stop=stop,
                                      on_status=lambda s: console.print(f"  {kind} status: {s}", highlight=False,
                                                                        markup=False))
    except KeyboardInterrupt:
        raise fail(f"stopped following; {kind} {opts.namespace}/{name} keeps running. Follow it again with the same "
                    f"command and --run-id {run}, or delete it: kubectl -n {opts.namespace} delete "
                    f"{kind.lower()}s {name}") from None
    job = result.job
    t = Table(title=f"training run {run} ({kind} {job.namespace}/{job.name})", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("job", f"{job.status}" + (" (adopted: it existed already)" if job.adopted else "")
              + (" (a failed job was replaced)" if job.replaced else ""))
    t.add_row("epochs", str(result.epochs))
    last = result.history[-1] if result.history else {}
    if "val_accuracy" in last:
        t.add_row("validation accuracy", f"{last['val_accuracy']:.4f}")
    t.add_row("wait", f"{job.wall_s:.0f} s")
    t.add_row("bundle", result.bundle_uri)
    t.add_row("final checkpoint", result.checkpoint_uri)
    if job.model_artifacts:
        t.add_row("SageMaker model artifacts", job.model_artifacts)
    print_table(t)


def tune(
    config: ConfigOpt = None,
    env: EnvOpt = None,
    trials: Annotated[int, typer.Option(help="Trials to run.")] = 12,
    epochs: Annotated[int | None, typer.Option(help="Max epochs per trial (default: training.epochs).")] = None,
    time_budget: Annotated[float, typer.Option(help="Stop starting trials after this many seconds.")] = 600.0,
    concurrency: Annotated[int, typer.Option(help="Trials running at once.")] = 2,
    run_id: Annotated[str | None, typer.Option(help="Run id (default: generated).")] = None,
) -> None:
    """Search hyperparameters with Ray Tune (Optuna TPE, ASHA early stopping); log trials to MLflow."""
    from kubeml.data import ingest
    from kubeml.training.tune import TuneOptions, run_tune

    cfg = _with_overrides(load_env(config, env), epochs=epochs)
    store = cfg.artifact_store.open()
    run = run_id or _new_run_id("tune")
    try:
        m = ingest(store, cfg.data)
        console.print(f"kubeml tune [bold]{run}[/bold] · {trials} trials · up to {cfg.training.epochs} epochs each")
        with console.status("tuning (Optuna TPE + ASHA)..."):
            result = run_tune(cfg, store, dataset=m.name, dataset_version=m.version, run_id=run,
                              options=TuneOptions(trials=trials, time_budget_s=time_budget, max_concurrent=concurrency))
    except KubemlError as exc:
        raise fail(exc) from None
    t = Table(title=f"tune {run}: trials by validation accuracy", title_justify="left")
    for col in ("trial", "val_accuracy", "val_loss", "epochs", "learning_rate", "batch_size", "weight_decay", "warmup"):
        t.add_column(col)
    for tr in result.trials:
        c = tr["config"]
        t.add_row(tr["trial_id"], f"{tr.get('val_accuracy', float('nan')):.4f}", f"{tr.get('val_loss', float('nan')):.4f}",
                  str(tr.get("epochs", "")), f"{c['learning_rate']:.2e}", str(c["batch_size"]),
                  f"{c['weight_decay']:.1e}", f"{c['warmup_fraction']:.2f}")
    print_table(t)
    console.print(f"best: {json.dumps(result.best_config)} (val_accuracy {result.best_val_accuracy:.4f}); "
                  f"default config: {result.default_val_accuracy:.4f}; MLflow run {result.mlflow_run_id}")


def register(app: typer.Typer) -> None:
    """Add ``kubeml train`` and ``kubeml tune`` to the top-level app."""
    app.command("train")(train)
    app.command("tune")(tune)

