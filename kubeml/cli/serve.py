"""``kubeml serve``: deploy, list and stop local model servers.

A Typer sub-application mounted as ``kubeml serve``. Imports neither kserve nor torch, so
``status`` answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kubeml.cli._common import (
    ConfigOpt,
    EnvOpt,
    Output,
    OutputOpt,
    StateDirOpt,
    console,
    emit,
    fail,
    failures_exit,
    serving_state_dir,
)
from kubeml.errors import ConfigError

__all__ = ["app"]

app = typer.Typer(help="Serve models locally (KServe model servers).", no_args_is_help=True)


def _manager(state_dir: Path | None, config: Path | None = None, env: str | None = None):
    from kubeml.serving.manager import ServingManager

    return ServingManager(serving_state_dir(state_dir, config, env))


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
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    env: EnvOpt = None,
) -> None:
    """Start (or replace) a model server for BUNDLE_DIR and wait until it is ready."""
    with failures_exit():
        options = _server_options(
            batch_max_size=batch_max_size,
            batch_max_latency_ms=batch_max_latency_ms,
            request_timeout_s=request_timeout_s,
        )
        served = _manager(state_dir, config, env).deploy(
            name, bundle_dir, version=version, http_port=port, grpc_port=grpc_port, **options
        )
    console.print(f"[green]ready[/green] {served.name} (pid {served.pid})")
    console.print(f"  V1: {served.v1_url}")
    console.print(f"  V2: {served.v2_url}")


def _routers(root_dir: Path) -> list:
    """Live rollout routers (one per model deployed through the rollout engine)."""
    from kubeml.serving.rollout.local import LocalBackend

    root = root_dir / "rollouts"
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        router = LocalBackend(d.name, state_dir=root_dir).router() if (d / "router.json").is_file() else None
        if router is not None:
            found.append(router)
    return found


@app.command()
def status(
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    env: EnvOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List model servers and routers with their URLs and health."""
    with failures_exit():
        manager = _manager(state_dir, config, env)
        servers = manager.status()
        routers = _routers(manager.state_dir)
    data = [
        {"kind": "router", "name": r.model, "version": None, "pid": r.pid, "state": "up", "url": r.url,
         "v2_url": f"{r.url}/v2/models/{r.model}/infer", "grpc": r.grpc_target}
        for r in routers
    ] + [
        {"kind": "server", "name": s.instance or s.name, "version": s.version or None, "pid": s.pid,
         "state": "ready" if s.ready else ("not ready" if s.alive else "dead"), "url": s.url,
         "v2_url": s.v2_url, "grpc": f"{s.host}:{s.grpc_port}" if s.grpc_port is not None else None}
        for s in servers
    ]
    colour = {"up": "green", "ready": "green", "not ready": "yellow", "dead": "red"}
    rows = [
        (f"{d['name']} (router)" if d["kind"] == "router" else d["name"], d["version"] or "-", d["pid"],
         f"[{colour[d['state']]}]{d['state']}[/]", d["url"], d["v2_url"], d["grpc"] or "-")
        for d in data
    ]
    emit(output, data, columns=("name", "version", "pid", "state", "url", "V2 infer", "gRPC"), rows=rows,
         empty="no model servers")


@app.command()
def stop(
    name: Annotated[str | None, typer.Argument(help="Model to stop (default: all).")] = None,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    env: EnvOpt = None,
) -> None:
    """Stop one model server, or all of them (with their routers)."""
    from kubeml.serving.rollout.local import LocalBackend

    with failures_exit():
        manager = _manager(state_dir, config, env)
        stopped = []
        for r in _routers(manager.state_dir):
            if name is None or r.model == name:
                stopped += LocalBackend(r.model, state_dir=manager.state_dir).stop()
        stopped += manager.stop(name)
    if not stopped:
        if name:
            raise fail(f"no model server named {name!r}")
        console.print("no model servers")
        return
    for n in stopped:
        console.print(f"stopped {n}")
