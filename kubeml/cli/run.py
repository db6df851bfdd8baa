"""``kubeml run`` (the whole pipeline on kfp.local) and ``kubeml pipeline compile``."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from kubeml._files import atomic_write_text
from kubeml.cli._common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_GATE,
    EXIT_ROLLED_BACK,
    ConfigOpt,
    EnvOpt,
    console,
    err_console,
    fail,
    load_env,
    print_table,
)

__all__ = ["pipeline_app", "register"]

#: Targets ``kubeml run --target`` accepts.
RUN_TARGETS = ("local",)

pipeline_app = typer.Typer(help="Compile the pipeline for a Kubeflow Pipelines backend.", no_args_is_help=True)

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


def run(
    config: ConfigOpt = None,
    env: EnvOpt = None,
    target: Annotated[str, typer.Option(help="Where the pipeline runs: local (kfp.local).")] = "local",
    run_id: Annotated[str | None, typer.Option(help="Run id (default: generated).")] = None,
) -> None:
    """Run the training pipeline end to end: ingest, validate, train, evaluate, gate, register, deploy."""
    from kubeml.ledger import Ledger
    from kubeml.registry import code_version

    cfg = load_env(config, env)
    if target not in RUN_TARGETS:
        raise fail(f"--target {target!r} is not supported; allowed values: {', '.join(RUN_TARGETS)}", EXIT_CONFIG)
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
        raise fail("the gate passed but register did not run; see " + str(log_path))
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
    print_table(t)


_IMAGE_REF = re.compile(r"^[a-z0-9][a-z0-9._/:-]*[a-z0-9](:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$")


@pipeline_app.command("compile")
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the KFP IR YAML.")] = Path("pipeline.yaml"),
    image: Annotated[str | None, typer.Option(
        help="Image every step runs in (default: the runtime image, "
             "$KUBEML_IMAGE_REGISTRY/kubeml-python:<version>).")] = None,
) -> None:
    """Compile the training pipeline to KFP v2 IR YAML (for kfp.Client or the Kubeflow UI)."""
    import tempfile

    import yaml
    from kfp import compiler

    from kubeml.components import IMAGE
    from kubeml.pipelines.training import training_pipeline

    if output.exists() and output.is_dir():
        raise fail(f"{output} is a directory; give a file path", EXIT_CONFIG)
    if image is not None and not _IMAGE_REF.fullmatch(image):
        raise fail(f"--image {image!r} is not an image reference (registry/name:tag or name@sha256:...)",
                   EXIT_CONFIG)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(training_pipeline, str(compiled))
        docs = list(yaml.safe_load_all(compiled.read_text()))
    replaced = 0
    for doc in docs:
        executors = ((doc or {}).get("deploymentSpec") or {}).get("executors") or {}
        for executor in executors.values():
            container = executor.get("container") or {}
            if image is not None and container.get("image") == IMAGE:
                container["image"] = image
                replaced += 1
    if image is not None and not replaced:
        raise fail(f"no step of the compiled pipeline runs in {IMAGE}; nothing to replace", EXIT_CONFIG)
    atomic_write_text(output, yaml.safe_dump_all(docs, sort_keys=False))
    console.print(f"wrote {output}" + (f" (steps run in {image})" if image else ""))


def register(app: typer.Typer) -> None:
    """Add ``kubeml run`` and ``kubeml pipeline`` to the main CLI."""
    app.command("run")(run)
    app.add_typer(pipeline_app, name="pipeline")
