"""``kubeml serve``: deploy, list and stop local model servers.

A Typer sub-application; the main CLI mounts it with ``app.add_typer(serve_app, name="serve")``.
Imports neither kserve nor torch, so ``status`` answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kubeml.errors import ConfigError, KubemlError
from kubeml.serving.manager import ServingManager, default_state_dir

__all__ = ["app"]

app = typer.Typer(help="Serve models locally (KServe model servers).", no_args_is_help=True)
_console = Console(soft_wrap=True)  # long paths and URLs stay on one line

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Where server state and logs live. Default: $KUBEML_HOME/serving, "
        "or ./.kubeml/serving.",
        show_default=False,
    ),
]


def _manager(state_dir: Path | None) -> ServingManager:
    # Resolved per call, not at import: KUBEML_HOME and the cwd may change in between.
    return ServingManager(state_dir if state_dir is not None else default_state_dir())


def _fail(exc: KubemlError) -> typer.Exit:
    _console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(code=1)


#: ``serving`` config keys -> the ``kubeml serve deploy`` flags that set the same thing.
_FLAGS = {
    "batch_max_size": "--batch-max-size",
    "batch_max_latency_ms": "--batch-max-latency-ms",
    "request_timeout_s": "--request-timeout-s",
}


def _server_options(**values: float | None) -> dict:
    """Batching/timeout flags checked as the ``serving`` config keys are, errors in flag names."""
    from pydantic import ValidationError

    from kubeml.config import ServingConfig

    try:
        return ServingConfig(**values).server_options()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            for key, flag in _FLAGS.items():
                message = message.replace(key, flag)
            where = ".".join(_FLAGS.get(str(p), str(p)) for p in err["loc"])
            problems.append(f"{where}: {message}" if where else message)
        raise ConfigError("; ".join(problems)) from None


@app.command()
def deploy(
    bundle_dir: Annotated[Path, typer.Argument(help="Model bundle directory.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name in the URL.")],
    version: Annotated[str, typer.Option("--version", help="Model version label.")] = "",
    port: Annotated[
        int | None, typer.Option("--port", "-p", help="HTTP port (default: a free one).")
    ] = None,
    grpc_port: Annotated[int | None, typer.Option("--grpc-port", help="Enable gRPC.")] = None,
    batch_max_size: Annotated[
        int | None,
        typer.Option(
            "--batch-max-size",
            min=1,
            help="Adaptive batching: most instances per forward pass, summed over requests.",
        ),
    ] = None,
    batch_max_latency_ms: Annotated[
        float | None,
        typer.Option(
            "--batch-max-latency-ms",
            min=0,
            help="Longest wait of the oldest queued request before its batch runs (needs --batch-max-size).",
        ),
    ] = None,
    request_timeout_s: Annotated[
        float | None,
        typer.Option(
            "--request-timeout-s",
            min=0,
            help="Answer 504 when one inference takes longer (0: no limit; default 30).",
        ),
    ] = None,
    state_dir: StateDir = None,
) -> None:
    """Start (or replace) a model server for BUNDLE_DIR and wait until it is ready."""
    try:
        options = _server_options(
            batch_max_size=batch_max_size,
            batch_max_latency_ms=batch_max_latency_ms,
            request_timeout_s=request_timeout_s,
        )
        served = _manager(state_dir).deploy(
            name, bundle_dir, version=version, http_port=port, grpc_port=grpc_port, **options
        )
    except KubemlError as exc:
        raise _fail(exc) from None
    _console.print(f"[green]ready[/green] {served.name} (pid {served.pid})")
    _console.print(f"  V1: {served.v1_url}")
    _console.print(f"  V2: {served.v2_url}")


def _routers(state_dir: Path | None) -> list:
    """Live rollout routers (one per model deployed through the rollout engine)."""
    from kubeml.serving.rollout.local import LocalBackend

    root = _manager(state_dir).state_dir / "rollouts"
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        router = LocalBackend(d.name, state_dir=root.parent).router() if (d / "router.json").is_file() else None
        if router is not None:
            found.append(router)
    return found


@app.command()
def status(state_dir: StateDir = None) -> None:
    """List model servers with their URLs and health."""
    try:
        servers = _manager(state_dir).status()
    except KubemlError as exc:
        raise _fail(exc) from None
    routers = _routers(state_dir)
    if not servers and not routers:
        _console.print("no model servers")
        return
    table = Table("name", "version", "pid", "state", "url", "V2 infer", "gRPC")
    for r in routers:
        table.add_row(f"{r.model} (router)", "-", str(r.pid), "[green]up[/green]", r.url,
                      f"{r.url}/v2/models/{r.model}/infer", r.grpc_target or "-")
    for s in servers:
        state = (
            "[green]ready[/green]"
            if s.ready
            else ("[yellow]not ready[/yellow]" if s.alive else "[red]dead[/red]")
        )
        grpc = f"{s.host}:{s.grpc_port}" if s.grpc_port is not None else "-"
        table.add_row(s.instance or s.name, s.version or "-", str(s.pid), state, s.url, s.v2_url, grpc)
    _console.print(table)


@app.command()
def stop(
    name: Annotated[str | None, typer.Argument(help="Model to stop (default: all).")] = None,
    state_dir: StateDir = None,
) -> None:
    """Stop one model server, or all of them."""
    try:
        from kubeml.serving.rollout.local import LocalBackend

        stopped = []
        for r in _routers(state_dir):
            if name is None or r.model == name:
                stopped += LocalBackend(r.model, state_dir=_manager(state_dir).state_dir).stop()
        stopped += _manager(state_dir).stop(name)
    except KubemlError as exc:
        raise _fail(exc) from None
    if not stopped:
        _console.print(f"no model server named {name!r}" if name else "no model servers")
        if name:
            raise typer.Exit(code=1)
        return
    for n in stopped:
        _console.print(f"stopped {n}")
