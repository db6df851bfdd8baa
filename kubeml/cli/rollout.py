"""``kubeml deploy``, ``kubeml rollout status|promote|abort`` and ``kubeml predict-batch``.

Registered on the main CLI through ``register(app)``. Imports neither kserve nor torch;
MLflow is imported only when a registry version is resolved.

    kubeml deploy digits --version 4 --canary 10 --steps 10,50,100
    kubeml rollout status digits
    kubeml rollout promote digits        # skip the remaining steps
    kubeml rollout abort digits          # back to the stable version now
    kubeml rollout stop digits           # stop the router and every version server
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from kubeml.cli._common import (
    EXIT_ROLLED_BACK,
    ConfigOpt,
    EnvOpt,
    Output,
    OutputOpt,
    StateDirOpt,
    console,
    emit,
    failures_exit,
    load_env,
    serving_state_dir,
)
from kubeml.errors import ConfigError, ServingError

__all__ = ["register", "rollout_app"]

rollout_app = typer.Typer(
    help="Canary / blue-green rollouts: status, promote, abort.", no_args_is_help=True
)


def _load_rows(path: Path) -> Any:
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        return frame.select_dtypes("number").to_numpy(dtype="float32")
    raise ConfigError(f"replay file {path} must be .npy, .csv or .parquet")


def _resolve_registry_version(cfg: Any, model: str, version: str, bundle: Path | None = None) -> tuple[Path, Any]:
    """Bundle directory and held-out rows of an approved registry version.

    ``bundle`` (``--bundle``) serves a local copy instead of the store's: it must be the
    bundle registered for that version, byte for byte (its digest), with the approval that
    covers it, exactly as a downloaded one.
    """
    from kubeml.registry import Registry, verified_bundle

    try:
        number = int(version)
    except ValueError:
        raise ConfigError(f"registry versions are integers, got {version!r}") from None
    reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
    mv = reg.get(model, number)
    if not mv.approved:
        raise ServingError(
            f"{model} version {mv.version} is {mv.approval_status}, not approved; refusing to "
            f"deploy it (approve it with: kubeml models approve {mv.version} --env {cfg.name})"
        )
    store = cfg.artifact_store.open()
    if bundle is not None:
        if not bundle.is_dir():
            raise ConfigError(f"--bundle {bundle} is not a directory")
        verified_bundle(mv, bundle, public_key=cfg.signing.public_key)
        return bundle, _heldout_rows(store, mv)
    root = store.uri.rstrip("/") + "/"
    if not mv.source.startswith(root):
        raise ServingError(f"model source {mv.source} is outside the artifact store {store.uri}")
    key = mv.source[len(root):]
    bundle = store.local_path(key)
    if bundle is None:
        bundle = store.get_dir(key, Path(cfg.home) / "cache" / "bundles" / f"{model}-v{mv.version}")
    verified_bundle(mv, bundle, public_key=cfg.signing.public_key)  # what was approved is what is served
    return Path(bundle), _heldout_rows(store, mv)


def _heldout_rows(store: Any, mv: Any) -> Any:
    dataset, dataset_version = mv.tags.get("dataset"), mv.tags.get("dataset_version")
    if not (dataset and dataset_version):
        return None
    from kubeml.data import load_dataset

    rows, _ = load_dataset(store, dataset, dataset_version).test()
    return rows


def _print_decision(d: Any) -> None:
    d = d if isinstance(d, dict) else d.__dict__
    m = d.get("metrics") or {}
    canary = m.get("canary") or {}
    stable = m.get("stable") or {}
    detail = ""
    if canary:
        detail = (
            f" canary {canary.get('requests', 0)} req, err {canary.get('error_rate', 0):.3f}, "
            f"p99 {canary.get('p99_ms', 0):.1f} ms | stable {stable.get('requests', 0)} req, "
            f"p99 {stable.get('p99_ms', 0):.1f} ms | divergence {m.get('divergence', 0):.3f}"
        )
    verdict = f" {d['verdict']}" if d.get("verdict") else ""
    reasons = f" ({'; '.join(d['reasons'])})" if d.get("reasons") else ""
    when = datetime.fromtimestamp(d["ts"]).strftime("%H:%M:%S")
    shadow = " shadow" if d.get("mirror") else ""
    console.print(
        f"{when} {d['action']:<13} weight {d['weight']:>3}%{shadow}{verdict}{detail}{reasons}",
        highlight=False,
    )


def deploy(
    model: Annotated[str, typer.Argument(help="Registered model name (also the URL name).")],
    version: Annotated[str, typer.Option("--version", "-v", help="Registry version to deploy.")],
    canary: Annotated[int | None, typer.Option("--canary", help="First canary traffic percent.")] = None,
    steps: Annotated[str | None, typer.Option("--steps", help="Traffic steps, e.g. 10,50,100.")] = None,
    blue_green: Annotated[bool, typer.Option("--blue-green", help="Switch all traffic at once; instant switch back.")] = False,
    shadow: Annotated[int, typer.Option("--shadow", help="Passing shadow (mirror) analyses before any split.")] = 0,
    no_canary: Annotated[bool, typer.Option("--no-canary", help="Replace the stable version without analysis.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds per analysis window.")] = 10.0,
    max_error_rate: Annotated[float, typer.Option("--max-error-rate")] = 0.05,
    max_p99_ms: Annotated[float, typer.Option("--max-p99-ms")] = 1000.0,
    max_divergence: Annotated[float, typer.Option("--max-divergence")] = 0.2,
    failure_limit: Annotated[int, typer.Option("--failure-limit")] = 2,
    min_requests: Annotated[int, typer.Option("--min-requests", help="Canary requests a window needs to be judged.")] = 20,
    bundle: Annotated[Path | None, typer.Option("--bundle", help="Serve this local copy of the version's bundle (verified against the registered digest and approval).")] = None,
    replay: Annotated[Path | None, typer.Option("--replay", help="Held-out rows (.npy/.csv/.parquet) replayed as traffic.")] = None,
    no_replay: Annotated[bool, typer.Option("--no-replay", help="Do not replay held-out data (live traffic only).")] = False,
    replay_rate: Annotated[float, typer.Option("--replay-rate", help="Replayed requests per second (0: unlimited).")] = 50.0,
    port: Annotated[int | None, typer.Option("--port", "-p", help="Router port (default: serving.http_port).")] = None,
    payload_sample_rate: Annotated[float | None, typer.Option("--payload-sample-rate", help="Log this share of payloads.")] = None,
    config: ConfigOpt = None,
    env: EnvOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Deploy VERSION of MODEL: first version directly, later ones as an analysed canary."""
    from kubeml.serving.rollout.engine import RolloutPolicy
    from kubeml.serving.rollout.local import deploy_local

    with failures_exit(ValueError):
        cfg = load_env(config, env)  # the registry decides, with --bundle too
        if blue_green:
            step_list: tuple[int, ...] = (100,)
        elif steps is not None:
            step_list = RolloutPolicy.parse_steps(steps)
        elif canary is not None:
            step_list = (canary, 100) if canary < 100 else (100,)
        else:
            step_list = (10, 50, 100)
        if canary is not None and not blue_green and step_list[0] != canary:
            raise ConfigError(f"--canary {canary} must equal the first of --steps {steps}")
        policy = RolloutPolicy(
            steps=step_list, interval_s=interval, max_error_rate=max_error_rate,
            max_p99_ms=max_p99_ms, max_divergence=max_divergence, failure_limit=failure_limit,
            shadow_analyses=shadow, strategy="bluegreen" if blue_green else "canary",
            min_requests=min_requests,
        )  # fmt: skip
        bundle_dir, rows = _resolve_registry_version(cfg, model, version, bundle)
        if replay is not None:
            rows = _load_rows(replay)
        if no_replay:
            rows = None
        outcome = deploy_local(
            model, version, bundle_dir,
            state_dir=serving_state_dir(state_dir, config, env),
            host=cfg.serving.host,
            router_port=port if port is not None else cfg.serving.http_port,
            router_grpc_port=cfg.serving.grpc_port,
            policy=policy, canary=not no_canary, replay_rows=rows,
            replay_rate_per_s=replay_rate or None,
            payload_sample_rate=payload_sample_rate, listener=_print_decision,
            **cfg.serving.server_options(),
        )  # fmt: skip
    colour = {"promoted": "green", "deployed": "green", "replaced": "green", "unchanged": "blue"}
    console.print(
        f"[{colour.get(outcome.action, 'red')}]{outcome.action}[/] {outcome.model}: serving "
        f"version {outcome.stable_version} at {outcome.url}/v2/models/{outcome.model}/infer"
        + (f" and gRPC {outcome.grpc_target}" if outcome.grpc_target else "")
        + (f" ({outcome.reason})" if outcome.reason else ""),
        highlight=False,
    )
    if outcome.action in ("rolled_back", "aborted"):
        raise typer.Exit(EXIT_ROLLED_BACK)  # as for `kubeml run`: the version before it keeps serving


@rollout_app.command("status")
def status(
    model: Annotated[str, typer.Argument(help="Model name.")],
    all_rollouts: Annotated[bool, typer.Option("--all", help="Decisions of every rollout, not just the last.")] = False,
    config: ConfigOpt = None,
    env: EnvOpt = None,
    state_dir: StateDirOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Show the current routes, the last rollout and its decisions with their metrics."""
    from kubeml.serving.rollout.engine import DecisionLog
    from kubeml.serving.rollout.local import LocalBackend, engine_alive, read_json

    with failures_exit():
        backend = LocalBackend(model, state_dir=serving_state_dir(state_dir, config, env))
        router = backend.router()
        routes = router.routes() if router is not None else None
    state = read_json(backend.state_file)
    phase = None
    if state:
        running = engine_alive(state)
        phase = state["phase"] if running or state["phase"] not in ("starting", "running") else "interrupted"
    decisions = (
        list(DecisionLog(backend.decisions_file).read(None if all_rollouts else state["rollout_id"])) if state else []
    )
    if output is not Output.table:
        emit(output, {
            "model": model,
            "served": routes is not None,
            "url": router.url if routes is not None else None,
            "grpc": router.grpc_target if routes is not None else None,
            "routes": routes.to_dict() if routes is not None else None,
            "rollout": {**state, "phase": phase} if state else None,
            "decisions": [d if isinstance(d, dict) else d.__dict__ for d in decisions],
        })
        return
    if routes is None:
        console.print(f"{model}: not served (no router running)")
    else:
        canary = (
            f", canary {routes.canary_version} at {routes.weight}%" + (" (shadow)" if routes.mirror else "")
            if routes.canary else ""
        )
        grpc = f" (gRPC {router.grpc_target})" if router.grpc_target else ""
        console.print(f"{model}: stable {routes.stable_version} at {router.url}{grpc}{canary}", highlight=False)
    if not state:
        console.print("no rollouts yet")
        return
    console.print(
        f"rollout {state['rollout_id']}: {state['stable_version']} -> {state['canary_version']} "
        f"\\[{state['strategy']}, steps {state['steps']}] phase {phase}, weight {state['weight']}%, "
        f"failures {state['failures']}",
        highlight=False,
    )
    # One line per decision (not a table): long reasons stay whole and greppable.
    for d in decisions:
        _print_decision(d)


def _steer(model: str, command: str, state_dir: Path) -> None:
    from kubeml.serving.rollout.engine import Decision, DecisionLog
    from kubeml.serving.rollout.local import LocalBackend, engine_alive, read_json

    backend = LocalBackend(model, state_dir=state_dir)
    state = read_json(backend.state_file)
    if engine_alive(state):
        backend.control_file.parent.mkdir(parents=True, exist_ok=True)
        backend.control_file.write_text(json.dumps({"command": command}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = read_json(backend.state_file) or {}
            if state.get("phase") not in ("starting", "running"):
                console.print(f"{model}: rollout {state.get('rollout_id')} {state.get('phase')}")
                return
            time.sleep(0.2)
        raise ServingError(f"the rollout of {model!r} did not act on {command!r} within 60 s")
    router = backend.router()
    routes = router.routes() if router is not None else None
    if routes is None or routes.canary is None:
        raise ServingError(f"{model!r} has no rollout in progress (no canary behind its router)")
    # The process that ran the rollout is gone; act on the routes directly.
    if command == "promote":
        backend.promote()
    else:
        backend.rollback()
    DecisionLog(backend.decisions_file).append(
        Decision(
            rollout_id=(state or {}).get("rollout_id", "manual"), model=model,
            stable_version=routes.stable_version, canary_version=routes.canary_version,
            action="promote" if command == "promote" else "abort",
            weight=100 if command == "promote" else 0, reasons=(f"{command} by operator",),
        )  # fmt: skip
    )
    if state:
        state.update(phase="promoted" if command == "promote" else "aborted",
                     weight=100 if command == "promote" else 0, updated_at=time.time())
        backend.state_file.write_text(json.dumps(state, indent=2))
    console.print(f"{model}: {'promoted' if command == 'promote' else 'aborted'}")


@rollout_app.command("promote")
def promote(
    model: Annotated[str, typer.Argument(help="Model name.")],
    config: ConfigOpt = None,
    env: EnvOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Skip the remaining steps: the canary takes all traffic and becomes stable."""
    with failures_exit():
        _steer(model, "promote", serving_state_dir(state_dir, config, env))


@rollout_app.command("abort")
def abort(
    model: Annotated[str, typer.Argument(help="Model name.")],
    config: ConfigOpt = None,
    env: EnvOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Roll back now: all traffic to the stable version, canary stopped."""
    with failures_exit():
        _steer(model, "abort", serving_state_dir(state_dir, config, env))


@rollout_app.command("stop")
def stop(
    model: Annotated[str, typer.Argument(help="Model name.")],
    config: ConfigOpt = None,
    env: EnvOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Stop serving MODEL: its router and every version server."""
    from kubeml.serving.rollout.local import LocalBackend

    with failures_exit():
        stopped = LocalBackend(model, state_dir=serving_state_dir(state_dir, config, env)).stop()
    console.print("\n".join(f"stopped {s}" for s in stopped) or f"{model}: nothing running")


def predict_batch(
    model: Annotated[str, typer.Argument(help="Served model name.")],
    input_path: Annotated[Path, typer.Option("--input", "-i", help="CSV or Parquet dataset.")],
    output_path: Annotated[Path, typer.Option("--output", "-o", help="CSV or Parquet output.")],
    url: Annotated[str | None, typer.Option("--url", help="Server or router URL (default: the model's local router).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Non-feature column (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    concurrency: Annotated[int, typer.Option("--concurrency")] = 4,
    config: ConfigOpt = None,
    env: EnvOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Predict a dataset through a served model; rows come back with class and version."""
    from kubeml.serving.batch import predict_file
    from kubeml.serving.manager import ServingManager
    from kubeml.serving.rollout.local import LocalBackend

    with failures_exit():
        if url is None:
            states = serving_state_dir(state_dir, config, env)
            router = LocalBackend(model, state_dir=states).router()
            served = ServingManager(states).get(model) if router is None else None
            if router is None and served is None:
                raise ServingError(f"model {model!r} is not served here; pass --url or deploy it first")
            url = router.url if router is not None else served.url
        rows = predict_file(
            input_path, output_path, url=url, model=model, exclude=tuple(exclude or ()),
            batch_size=batch_size, concurrency=concurrency,
        )  # fmt: skip
    console.print(f"wrote {rows} predictions to {output_path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``kubeml deploy``, ``kubeml predict-batch`` and ``kubeml rollout`` to the main CLI."""
    app.command("deploy")(deploy)
    app.command("predict-batch")(predict_batch)
    app.add_typer(rollout_app, name="rollout")
