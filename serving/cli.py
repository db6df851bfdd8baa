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

from kubeml.errors import KubemlError
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


@app.command()
def deploy(
    bundle_dir: Annotated[Path, typer.Argument(help="Model bundle directory.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name in the URL.")],
    version: Annotated[str, typer.Option("--version", help="Model version label.")] = "",
    port: Annotated[
        int | None, typer.Option("--port", "-p", help="HTTP port (default: a free one).")
    ] = None,
    grpc_port: Annotated[int | None, typer.Option("--grpc-port", help="Enable gRPC.")] = None,
    state_dir: StateDir = None,
) -> None:
    """Start (or replace) a model server for BUNDLE_DIR and wait until it is ready."""
    try:
        served = _manager(state_dir).deploy(
            name, bundle_dir, version=version, http_port=port, grpc_port=grpc_port
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
