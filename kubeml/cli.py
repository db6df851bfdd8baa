"""``kubeml``: the command line.

Exit codes: 0 success; 1 a stage or command failed; 2 bad configuration or usage;
3 the model did not pass the promotion gate (a clean outcome: nothing was registered);
4 the new version was registered but its canary was rolled back (the previous version serves).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from kubeml.config import ENVIRONMENTS, EnvironmentConfig, load_config
from kubeml.errors import ConfigError, KubemlError

__all__ = ["app", "main"]

EXIT_FAILED, EXIT_CONFIG, EXIT_GATE, EXIT_ROLLED_BACK = 1, 2, 3, 4

app = typer.Typer(
    help="kubeml: Kubernetes-native ML platform (KFP, Ray Train, KServe, MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
pipeline_app = typer.Typer(help="Compile the pipeline for a Kubeflow Pipelines backend.", no_args_is_help=True)
models_app = typer.Typer(help="Model registry: list versions, approve or reject them.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and check kubeml.yaml.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="kubeml.yaml to use (default: ./kubeml.yaml, else built-in defaults).")
]
EnvOpt = Annotated[
    str | None, typer.Option("--env", "-e", help=f"Environment: {', '.join(ENVIRONMENTS)} (default: $KUBEML_ENV or dev).")
]


def _load(config: Path | None, env: str | None) -> EnvironmentConfig:
    try:
        return load_config(config, env)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None


def _mount(name: str, module: str, help_text: str) -> None:
    """Mount the Typer sub-app ``module.app`` as ``kubeml NAME``."""
    import importlib

    app.add_typer(importlib.import_module(module).app, name=name, help=help_text)


def _register(module: str) -> None:
    """Let ``module.register(app)`` add its top-level commands (e.g. ``kubeml train``)."""
    import importlib

    importlib.import_module(module).register(app)


_mount("serve", "kubeml.serving.cli", "Local model servers: status, stop, deploy a bundle.")
_mount("cluster", "kubeml.cluster.cli", "Local Kubernetes control plane for integration tests.")
_register("kubeml.training.cli")
_register("kubeml.serving.rollout_cli")


# ---------------------------------------------------------------- run


_ICON = {"pending": "[dim]·[/dim]", "running": "[yellow]…[/yellow]", "succeeded": "[green]✓[/green]",
         "failed": "[red]✗[/red]", "skipped": "[blue]–[/blue]"}


def _progress_table(recs, title: str) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("", width=1)
    t.add_column("stage")
    t.add_column("time", justify="right")
    t.add_column("detail", overflow="fold")
    for r in recs:
        d = r.duration_s
        t.add_row(_ICON.get(r.status, "?"), r.stage, f"{d:6.1f}s" if d is not None else "", r.message)
    return t


def _new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@app.command()
def run(
    config: ConfigOpt = None,
    env: EnvOpt = None,
    target: Annotated[str, typer.Option(help="Where the pipeline runs: local (kfp.local).")] = "local",
    run_id: Annotated[str | None, typer.Option(help="Run id (default: generated).")] = None,
) -> None:
    """Run the training pipeline end to end: ingest, validate, train, evaluate, gate, register, deploy."""
    from kubeml.artifacts import open_store
    from kubeml.ledger import Ledger
    from kubeml.registry import code_version

    cfg = _load(config, env)
    if target != "local":
        err_console.print(f"[red]error:[/red] --target {target!r} is not supported; allowed values: local")
        raise typer.Exit(EXIT_CONFIG)
    run_id = run_id or _new_run_id()
    store = cfg.artifact_store.open()
    ledger = Ledger(store, run_id)
    run_dir = Path(cfg.home) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "config.json"
    cfg_file.write_text(cfg.model_dump_json(indent=2))
    version = code_version(Path(config).resolve().parent if config else Path.cwd())
    ledger.write_run({"run_id": run_id, "environment": cfg.name, "code_version": version,
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "target": target})
    log_path = run_dir / "pipeline.log"
    cmd = [sys.executable, "-m", "kubeml.pipelines.local", "--config-file", str(cfg_file), "--run-id", run_id,
           "--code-version", version, "--pipeline-root", str(Path(cfg.home) / "pipeline-root")]
    console.print(f"kubeml run [bold]{run_id}[/bold] · env [bold]{cfg.name}[/bold] · target local (kfp.local)")
    t0 = time.time()
    with log_path.open("w") as log, Live(console=console, refresh_per_second=4, transient=False) as live:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                live.update(_progress_table(ledger.all(), f"pipeline {time.time() - t0:.0f}s"))
                time.sleep(0.25)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=30)
            raise
        recs = ledger.all()
        live.update(_progress_table(recs, f"pipeline {time.time() - t0:.1f}s"))
    by = {r.stage: r for r in recs}
    failed = [r for r in recs if r.status == "failed"]
    if proc.returncode != 0 or failed:
        if failed:
            r = failed[0]
            err_console.print(f"[red]stage {r.stage} failed:[/red]\n{r.error or r.message}", highlight=False)
        else:
            tail = "\n".join(log_path.read_text().splitlines()[-30:])
            err_console.print(f"[red]pipeline failed[/red] (no stage recorded an error); log tail:\n{tail}")
        err_console.print(f"full log: {log_path}")
        raise typer.Exit(EXIT_FAILED)
    gate = by["gate"]
    if gate.outputs.get("passed") is False:
        console.print(f"[yellow]gate not passed:[/yellow] {'; '.join(gate.outputs.get('reasons', []))}")
        console.print("nothing was registered or deployed")
        raise typer.Exit(EXIT_GATE)
    if by["register"].status == "pending":
        # The gate said yes but the branch did not run: an orchestrator fault, never a silent success.
        err_console.print("[red]error:[/red] the gate passed but register did not run; see " + str(log_path))
        raise typer.Exit(EXIT_FAILED)
    _summary(by, run_id)
    dep = by["deploy"].outputs
    if dep.get("rollout") in ("rolled_back", "aborted"):
        console.print(f"[yellow]canary rolled back:[/yellow] {dep.get('reason')}")
        raise typer.Exit(EXIT_ROLLED_BACK)


def _summary(by, run_id: str) -> None:
    ing, ev, reg, dep = by["ingest"].outputs, by["evaluate"].outputs, by["register"].outputs, by["deploy"].outputs
    t = Table(title="summary", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("run", run_id)
    t.add_row("dataset version", f"{ing.get('dataset')}@{ing.get('version')}")
    t.add_row("test accuracy", f"{ev.get('accuracy', float('nan')):.4f}")
    t.add_row("macro-F1", f"{ev.get('macro_f1', float('nan')):.4f}")
    t.add_row("model version", f"{reg.get('model_name')} v{reg.get('version')} ({reg.get('approval_status')})")
    t.add_row("endpoint", dep.get("v2_url") or by["deploy"].message)
    if dep.get("rollout"):
        t.add_row("rollout", f"{dep['rollout']} (serving v{dep.get('stable_version')})")
    console.print(t)


# ---------------------------------------------------------------- pipeline


@pipeline_app.command("compile")
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the KFP IR YAML.")] = Path("pipeline.yaml"),
) -> None:
    """Compile the training pipeline to KFP v2 IR YAML (for kfp.Client or the Kubeflow UI)."""
    from kfp import compiler

    from kubeml.pipelines.training import training_pipeline

    if output.exists() and output.is_dir():
        err_console.print(f"[red]error:[/red] {output} is a directory; give a file path")
        raise typer.Exit(EXIT_CONFIG)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(training_pipeline, str(output))
    console.print(f"wrote {output}")


# ---------------------------------------------------------------- models


def _registry(cfg: EnvironmentConfig):
    from kubeml.registry import Registry

    return Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)


@models_app.command("list")
def models_list(config: ConfigOpt = None, env: EnvOpt = None) -> None:
    """List the registered versions of the environment's model."""
    cfg = _load(config, env)
    t = Table(title=cfg.registry.model_name)
    for col in ("version", "approval", "accuracy", "macro-F1", "dataset", "code", "source"):
        t.add_column(col)
    try:
        versions = _registry(cfg).versions(cfg.registry.model_name)
    except KubemlError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    for v in versions:
        t.add_row(str(v.version), v.approval_status, v.tags.get("metric.accuracy", ""), v.tags.get("metric.macro_f1", ""),
                  v.tags.get("dataset_version", ""), v.tags.get("code_version", ""), v.source)
    console.print(t)


def _set_approval(config, env, version: int, status: str) -> None:
    cfg = _load(config, env)
    try:
        mv = _registry(cfg).set_approval(cfg.registry.model_name, version, status)
    except KubemlError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    console.print(f"{mv.name} version {mv.version}: {mv.approval_status}")


@models_app.command("approve")
def models_approve(version: int, config: ConfigOpt = None, env: EnvOpt = None) -> None:
    """Approve a registered version for deployment."""
    _set_approval(config, env, version, "approved")


@models_app.command("reject")
def models_reject(version: int, config: ConfigOpt = None, env: EnvOpt = None) -> None:
    """Reject a registered version; it can no longer be deployed."""
    _set_approval(config, env, version, "rejected")


# ---------------------------------------------------------------- config


@config_app.command("show")
def config_show(config: ConfigOpt = None, env: EnvOpt = None) -> None:
    """Print the resolved configuration of one environment as JSON."""
    cfg = _load(config, env)
    console.print_json(cfg.model_dump_json())


@config_app.command("validate")
def config_validate(config: ConfigOpt = None) -> None:
    """Validate every environment in the config file."""
    _load(config, "dev")
    console.print("configuration is valid")


def main() -> None:
    try:
        app()
    except KubemlError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
