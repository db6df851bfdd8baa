"""``kubeml run`` (the whole pipeline on kfp.local) and ``kubeml pipeline compile``."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

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
    failures_exit,
    load_env,
    print_table,
)

__all__ = ["pipeline_app", "register"]

#: Targets ``kubeml run --target`` accepts.
RUN_TARGETS = ("local", "kubeflow")

pipeline_app = typer.Typer(help="Compile, submit, follow and schedule the pipeline on Kubeflow Pipelines.",
                            no_args_is_help=True)

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


ImageOpt = Annotated[str | None, typer.Option(
    help="Image every step runs in (default: the runtime image, $KUBEML_IMAGE_REGISTRY/kubeml-python:<version>).")]
HostOpt = Annotated[str | None, typer.Option(help="KFP API base URL (default: kubeflow.host).")]
NamespaceOpt = Annotated[str | None, typer.Option(help="Kubeflow profile namespace (default: kubeflow.namespace).")]
ExperimentOpt = Annotated[str | None, typer.Option(help="Experiment (default: kubeflow.experiment).")]
CreateExperimentOpt = Annotated[bool, typer.Option(
    "--create-experiment", help="Create the experiment if it does not exist (default: kubeflow.create_experiment).")]


def run(
    config: ConfigOpt = None,
    env: EnvOpt = None,
    target: Annotated[str, typer.Option(
        help="Where the pipeline runs: local (kfp.local) or kubeflow (kfp.Client, to kubeflow.host).")] = "local",
    run_id: Annotated[str | None, typer.Option(help="Run id (default: generated).")] = None,
    run_name: Annotated[str | None, typer.Option(help="Kubeflow: the run's name in the UI (default: the run id).")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Kubeflow: submit, print the run's URL and return.")] = False,
    image: ImageOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    experiment: ExperimentOpt = None,
    create_experiment: CreateExperimentOpt = False,
) -> None:
    """Run the training pipeline end to end: ingest, validate, train, evaluate, gate, register, deploy."""
    cfg = load_env(config, env)
    if target not in RUN_TARGETS:
        raise fail(f"--target {target!r} is not supported; allowed values: {', '.join(RUN_TARGETS)}", EXIT_CONFIG)
    run_id = run_id or _new_run_id()
    if target == "kubeflow":
        cfg = _with_kubeflow(cfg, host=host, namespace=namespace, experiment=experiment,
                             create_experiment=create_experiment or None)
        _submit_and_follow(cfg, config, run_id, run_name=run_name, image=image, wait=not no_wait)
        return
    for option, given in (("--no-wait", no_wait), ("--image", image), ("--host", host), ("--namespace", namespace),
                          ("--experiment", experiment), ("--create-experiment", create_experiment),
                          ("--run-name", run_name)):
        if given:
            raise fail(f"{option} applies to --target kubeflow only", EXIT_CONFIG)
    _run_local(cfg, config, run_id)


def _run_local(cfg, config: Path | None, run_id: str) -> None:
    from kubeml.ledger import Ledger
    from kubeml.registry import code_version

    store = cfg.artifact_store.open()
    ledger = Ledger(store, run_id)
    run_dir = Path(cfg.home) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "config.json"
    cfg_file.write_text(cfg.model_dump_json(indent=2))
    version = code_version(Path(config).resolve().parent if config else Path.cwd())
    ledger.write_run({"run_id": run_id, "environment": cfg.name, "code_version": version,
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "target": "local"})
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
    failed = [r for r in recs if r.status == "failed"]
    if proc.returncode != 0 and not failed:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        err_console.print(f"[red]pipeline failed[/red] (no stage recorded an error); log tail:\n{tail}")
        err_console.print(f"full log: {log_path}")
        raise typer.Exit(EXIT_FAILED)
    _conclude(recs, run_id, f"full log: {log_path}")


def _conclude(recs, run_id: str, where: str) -> None:
    """The run's outcome from its ledger, the same for every target: summary, or the exit code."""
    by = {r.stage: r for r in recs}
    failed = [r for r in recs if r.status == "failed"]
    if failed:
        r = failed[0]
        err_console.print(f"[red]stage {r.stage} failed:[/red]\n{r.error or r.message}", highlight=False)
        err_console.print(where)
        raise typer.Exit(EXIT_FAILED)
    gate = by.get("gate")
    if gate is None or gate.status != "succeeded":
        raise fail(f"the run ended before its gate decided; {where}")
    if gate.outputs.get("passed") is False:
        console.print(f"[yellow]gate not passed:[/yellow] {'; '.join(gate.outputs.get('reasons', []))}")
        console.print("nothing was registered or deployed")
        raise typer.Exit(EXIT_GATE)
    if by["register"].status == "pending" or by["deploy"].status == "pending":
        # The gate said yes but the branch did not run: an orchestrator fault, never a silent success.
        raise fail(f"the gate passed but register or deploy did not run; {where}")
    _summary(by, run_id)
    dep = by["deploy"].outputs
    if dep.get("rollout") in ("rolled_back", "aborted"):
        console.print(f"[yellow]canary rolled back:[/yellow] {dep.get('reason')}")
        raise typer.Exit(EXIT_ROLLED_BACK)


def _with_kubeflow(cfg, **overrides):
    """``cfg`` with the command line's ``kubeflow.*`` overrides, validated like the file."""
    from pydantic import ValidationError

    from kubeml.config import KubeflowConfig

    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return cfg
    try:
        kubeflow = KubeflowConfig.model_validate({**cfg.kubeflow.model_dump(), **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(f"invalid option --{'-'.join(map(str, first['loc'])).replace('_', '-')}: {first['msg']}",
                   EXIT_CONFIG) from None
    return cfg.model_copy(update={"kubeflow": kubeflow})


def _submit_and_follow(cfg, config: Path | None, run_id: str, *, run_name: str | None, image: str | None,
                       wait: bool) -> None:
    from kubeml.errors import KubemlError
    from kubeml.ledger import Ledger
    from kubeml.pipelines import kubeflow
    from kubeml.registry import code_version

    version = code_version(Path(config).resolve().parent if config else Path.cwd())
    with failures_exit():
        session = kubeflow.connect(cfg.kubeflow)
        submitted = kubeflow.submit(cfg, run_id=run_id, code_version=version, run_name=run_name, image=image,
                                    session=session)
    where = f"namespace {submitted.namespace}, " if submitted.namespace else ""
    console.print(f"kubeml run [bold]{run_id}[/bold] · env [bold]{cfg.name}[/bold] · target kubeflow "
                  f"({where}experiment {submitted.experiment})")
    console.print(f"run: {submitted.url}", highlight=False, markup=False)
    ledger = Ledger(cfg.artifact_store.open(), run_id)
    try:
        ledger.write_run({"run_id": run_id, "environment": cfg.name, "code_version": version,
                          "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "target": "kubeflow",
                          "kfp_run_id": submitted.kfp_run_id, "url": submitted.url})
    except KubemlError as exc:
        err_console.print(f"[yellow]warning:[/yellow] the run is submitted, but its record could not be written to "
                          f"{cfg.artifact_store.uri}: {exc}", highlight=False)
    if not wait:
        console.print(f"follow it with: kubeml pipeline follow {submitted.kfp_run_id}", highlight=False, markup=False)
        return
    _follow(cfg, session, submitted.kfp_run_id, run_id, ledger)


def _follow(cfg, session, kfp_run_id: str, run_id: str, ledger) -> None:
    from kubeml.errors import KubemlError
    from kubeml.pipelines import kubeflow

    t0 = time.time()
    state = {"run": None}

    def on_update(run) -> None:
        state["run"] = run

    stop = threading.Event()
    worker_error: list[BaseException] = []

    def work() -> None:
        try:
            kubeflow.follow(session, kfp_run_id, on_update=on_update, stop=stop)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the main thread
            worker_error.append(exc)

    worker = threading.Thread(target=work, name=f"follow-{kfp_run_id}", daemon=True)
    worker.start()
    recs = []
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while worker.is_alive():
                recs = _ledger_or_last(ledger, recs)
                live.update(_progress_table(recs, _kfp_title(state["run"], time.time() - t0)))
                worker.join(timeout=max(1.0, min(5.0, cfg.kubeflow.poll_s)))
            recs = _ledger_or_last(ledger, recs)
            live.update(_progress_table(recs, _kfp_title(state["run"], time.time() - t0)))
    except KeyboardInterrupt:
        stop.set()
        raise fail(f"stopped following; the run keeps going: {session.run_url(kfp_run_id)}. Follow it again with "
                   f"kubeml pipeline follow {kfp_run_id}") from None
    if worker_error:
        error = worker_error[0]
        raise fail(error) if isinstance(error, KubemlError) else error
    run = state["run"]
    where = f"the run: {session.run_url(kfp_run_id)}"
    final = str(run.state) if run is not None else "unknown"
    if final != "SUCCEEDED" and not any(r.status == "failed" for r in recs):
        details = kubeflow.failure_details(run)
        err_console.print(f"[red]the Kubeflow run ended {final}[/red]" + (f":\n{details}" if details else ""),
                          highlight=False)
        err_console.print(where)
        raise typer.Exit(EXIT_FAILED)
    _conclude(recs, run_id, where)


def _ledger_or_last(ledger, last):
    """The ledger's records; the last ones read when the store cannot be read just now."""
    from kubeml.errors import ArtifactError

    try:
        return ledger.all()
    except ArtifactError:
        return last


def _kfp_title(run, elapsed: float) -> str:
    state = str(run.state) if run is not None and run.state else "submitted"
    return f"kubeflow run {state.lower()} · {elapsed:.0f}s"


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


@pipeline_app.command("compile")
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the KFP IR YAML.")] = Path("pipeline.yaml"),
    image: ImageOpt = None,
    config: ConfigOpt = None,
    env: EnvOpt = None,
) -> None:
    """Compile the training pipeline to KFP v2 IR YAML (for kfp.Client or the Kubeflow UI).

    Each step's pod gets the resources and placement of the environment's kubeflow.tasks."""
    from kubeml.pipelines.kubeflow import compile_pipeline

    cfg = load_env(config, env)
    with failures_exit():
        compile_pipeline(output, image=image, kubeflow=cfg.kubeflow)
    console.print(f"wrote {output}" + (f" (steps run in {image})" if image else ""))


@pipeline_app.command("submit")
def pipeline_submit(
    config: ConfigOpt = None,
    env: EnvOpt = None,
    run_id: Annotated[str | None, typer.Option(help="Run id (default: generated).")] = None,
    run_name: Annotated[str | None, typer.Option(help="The run's name in the UI (default: the run id).")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Submit, print the run's URL and return.")] = False,
    image: ImageOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    experiment: ExperimentOpt = None,
    create_experiment: CreateExperimentOpt = False,
) -> None:
    """Submit the pipeline to Kubeflow Pipelines and follow the run (as kubeml run --target kubeflow)."""
    run(config=config, env=env, target="kubeflow", run_id=run_id, run_name=run_name, no_wait=no_wait, image=image,
        host=host, namespace=namespace, experiment=experiment, create_experiment=create_experiment)


@pipeline_app.command("follow")
def pipeline_follow(
    kfp_run_id: Annotated[str, typer.Argument(help="The KFP run id (the last part of the run's URL).")],
    config: ConfigOpt = None,
    env: EnvOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Follow a submitted run to its end; exit as kubeml run does."""
    from kubeml.ledger import Ledger
    from kubeml.pipelines import kubeflow

    cfg = _with_kubeflow(load_env(config, env), host=host, namespace=namespace)
    with failures_exit():
        session = kubeflow.connect(cfg.kubeflow)
        run = session.call(f"reading run {kfp_run_id}", session.client._run_api.run_service_get_run,  # noqa: SLF001
                           run_id=kfp_run_id)
    run_id = kubeflow.run_parameters(run).get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise fail(f"run {kfp_run_id} has no run_id parameter: it is not a kubeml pipeline run", EXIT_CONFIG)
    console.print(f"following kubeml run [bold]{run_id}[/bold]: {session.run_url(kfp_run_id)}", highlight=False)
    _follow(cfg, session, kfp_run_id, run_id, Ledger(cfg.artifact_store.open(), run_id))


@pipeline_app.command("schedule")
def pipeline_schedule(
    cron: Annotated[str, typer.Option(
        help="When: 5 cron fields (\"0 3 * * *\": 03:00 every day), 6 with seconds first, or @daily/@hourly/...")],
    name: Annotated[str, typer.Option(help="The recurring run's name; each run's id starts with it.")] = "kubeml-retrain",
    config: ConfigOpt = None,
    env: EnvOpt = None,
    max_concurrency: Annotated[int, typer.Option(help="Runs of this schedule at once.")] = 1,
    catchup: Annotated[bool, typer.Option(help="Start the runs missed while the schedule was paused.")] = False,
    image: ImageOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    experiment: ExperimentOpt = None,
    create_experiment: CreateExperimentOpt = False,
) -> None:
    """Create a recurring run of the pipeline on Kubeflow Pipelines (scheduled retraining)."""
    from kubeml.pipelines import kubeflow
    from kubeml.registry import code_version

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", name):
        raise fail(f"--name {name!r}: lower-case letters, digits and '-', at most 42 (it starts every run id)",
                   EXIT_CONFIG)
    cfg = _with_kubeflow(load_env(config, env), host=host, namespace=namespace, experiment=experiment,
                         create_experiment=create_experiment or None)
    version = code_version(Path(config).resolve().parent if config else Path.cwd())
    with failures_exit():
        created = kubeflow.schedule(cfg, cron=cron, name=name, code_version=version, image=image,
                                    max_concurrency=max_concurrency, catchup=catchup)
    console.print(f"recurring run [bold]{created.name}[/bold] · cron {created.cron} · experiment {created.experiment}",
                  highlight=False)
    console.print(f"recurring run: {created.url}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``kubeml run`` and ``kubeml pipeline`` to the main CLI."""
    app.command("run")(run)
    app.add_typer(pipeline_app, name="pipeline")
