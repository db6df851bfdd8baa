"""``kubeml cluster``: start, inspect and stop the local control plane.

A Typer sub-application; the main CLI mounts it as ``kubeml cluster``. ``up`` returns once
the cluster can run pods and leaves the processes running; ``down`` works from any shell
because everything it needs is in the cluster's state directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kubeml.cli._common import EXIT_CONFIG, Output, OutputOpt, console, emit, fail, failures_exit, print_table
from kubeml.errors import ClusterError
from kubeml.testing.cluster import Cluster, ClusterStatus

__all__ = ["app"]

app = typer.Typer(help="Local Kubernetes cluster (etcd, apiserver, kwok nodes, a real node).",
                  no_args_is_help=True)

NameOpt = Annotated[str, typer.Option("--name", "-n", help="Cluster name (one state directory each).")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="State directory (default: ~/.cache/kubeml/clusters/<name>).",
                 show_default=False),
]


def _print_status(status: ClusterStatus) -> None:
    if not status.components:
        console.print(f"cluster [bold]{status.name}[/bold]: not running")
        return
    console.print(f"cluster [bold]{status.name}[/bold] at {status.server}")
    console.print(f"  admin kubeconfig: {status.admin_kubeconfig}")
    for path in status.user_kubeconfigs:
        console.print(f"  user kubeconfig:  {path}")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("component", "pid", "running", "healthy", "detail"):
        table.add_column(column)
    for c in status.components:
        table.add_row(c.name, str(c.pid or ""), "yes" if c.running else "[red]no[/red]",
                      "yes" if c.healthy else "[red]no[/red]", c.detail)
    print_table(table)
    console.print(f"  logs: {status.state_dir / 'logs'}")


def _cluster(name: str, state_dir: Path | None) -> Cluster:
    try:
        return Cluster(name, state_dir=state_dir)
    except ClusterError as exc:  # a bad name or state directory: usage
        raise fail(exc, EXIT_CONFIG) from None


@app.command()
def up(
    name: NameOpt = "kubeml",
    port: Annotated[int, typer.Option(help="kube-apiserver port on 127.0.0.1; 0 picks a free one.")] = 0,
    state_dir: StateDirOpt = None,
    build: Annotated[bool, typer.Option(help="Build missing control-plane assets first (slow when cold).")] = True,
    timeout: Annotated[float, typer.Option(help="Start-up budget in seconds.")] = 120.0,
    real_node: Annotated[bool, typer.Option(
        "--real-node/--no-real-node",
        help="Also start a real node (kubelet + containerd + runc) whose pods run real containers; "
             "needs root, one per machine.")] = True,
) -> None:
    """Start etcd, kube-apiserver, controller-manager, scheduler, kwok with EKS-like fake nodes,
    and a real node that runs pods in containers (taint kubeml.io/node=real:NoSchedule)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.monotonic()
    with failures_exit():
        cluster = Cluster(name, state_dir=state_dir, apiserver_port=port, real_node=real_node)
        cluster.up(build_assets=build, timeout_s=timeout)
    console.print(f"started in {time.monotonic() - started:.1f} s")
    _print_status(cluster.status())
    console.print(f"\n  export KUBECONFIG={cluster.admin_kubeconfig}")


@app.command()
def down(name: NameOpt = "kubeml", state_dir: StateDirOpt = None) -> None:
    """Stop every component and delete the cluster's state directory."""
    cluster = _cluster(name, state_dir)
    was_running = cluster.status().running
    cluster.down()
    console.print(f"cluster {name}: {'stopped' if was_running else 'was not running'}; state removed")


@app.command()
def status(name: NameOpt = "kubeml", state_dir: StateDirOpt = None, output: OutputOpt = Output.table) -> None:
    """Print kubeconfig paths and the health of every component (exit 1 when unhealthy)."""
    result = _cluster(name, state_dir).status()
    if output is Output.table:
        _print_status(result)
    else:
        emit(output, {"name": result.name, "server": result.server, "running": result.running,
                      "healthy": result.healthy, "admin_kubeconfig": result.admin_kubeconfig,
                      "user_kubeconfigs": list(result.user_kubeconfigs), "state_dir": result.state_dir,
                      "components": list(result.components)})
    if not result.healthy:
        raise typer.Exit(1)


@app.command("kubeconfig")
def kubeconfig(
    user: Annotated[str, typer.Argument(help="User name (the certificate's CN).")],
    group: Annotated[list[str] | None, typer.Option("--group", "-g", help="Group (repeatable).")] = None,
    name: NameOpt = "kubeml",
    state_dir: StateDirOpt = None,
) -> None:
    """Write a kubeconfig for USER in the given groups and print its path."""
    with failures_exit():
        path = _cluster(name, state_dir).kubeconfig_for(user, tuple(group or ()))
    console.print(str(path))
