"""Local rollout backend: version servers behind a kubeml router on this machine.

Where it sits: the local target of ``kubeml deploy``. Each model gets one router process
(the port clients use) and one model server per live version, started through
:class:`~kubeml.serving.manager.ServingManager` under the instance key ``NAME-vVERSION``.
It speaks HTTP to the router's admin API and never imports kserve or torch.

State layout under ``state_dir`` (the same directory ``kubeml serve`` uses)::

    servers.json                  version servers (ServingManager)
    rollouts/NAME/router.json     router process: pid, port, gRPC port, routes file
    rollouts/NAME/routes.json     the router's current routes (rewritten by the router)
    rollouts/NAME/state.json      the current or last rollout (RolloutEngine)
    rollouts/NAME/decisions.jsonl every decision of every rollout, with its metrics
    rollouts/NAME/control.json    a pending operator command (promote / abort)
    payloads/NAME-vV.jsonl        sampled payload logs per version
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from kubeml._proc import free_port, log_tail, pid_alive, port_free, spawn, terminate_group
from kubeml.errors import ConfigError, ServingError
from kubeml.serving.manager import (
    LOG_TAIL_LINES,
    STOP_GRACE_S,
    ServedModel,
    ServingManager,
    _bind_host,
    default_state_dir,
)
from kubeml.serving.rollout.engine import BackendMetrics, WindowMetrics
from kubeml.serving.rollout.router import ADMIN_PREFIX, Routes
from kubeml.serving.tokens import first_token, write_token_file

__all__ = ["DeployOutcome", "LocalBackend", "RouterProcess", "deploy_local", "instance_name"]

_ROUTER_MODULE = "kubeml.serving.rollout.router"
#: Seconds for a router to answer its health check; it imports only aiohttp (~1 s cold).
ROUTER_READY_TIMEOUT_S = 60.0


def instance_name(model: str, version: str) -> str:
    """Instance key of one version's server.

    >>> instance_name("digits", "3")
    'digits-v3'
    """
    return f"{model}-v{version}" if version else model


@dataclass(frozen=True)
class RouterProcess:
    """A running router, as recorded in ``router.json``."""

    model: str
    pid: int
    port: int
    host: str
    routes_file: str
    log_file: str
    grpc_port: int | None = None
    """Port of the router's Open Inference Protocol gRPC front; None: REST only."""
    admin_token_file: str = ""
    """File (mode 0600) with the bearer token of the router's admin API."""

    def _admin_headers(self) -> dict[str, str]:
        try:
            token = Path(self.admin_token_file).read_text().strip() if self.admin_token_file else ""
        except OSError as exc:
            raise ServingError(f"router for {self.model!r}: cannot read its admin token: {exc}") from exc
        return {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def grpc_target(self) -> str | None:
        """``host:port`` for gRPC clients, or None when the router serves REST only."""
        return f"{self.host}:{self.grpc_port}" if self.grpc_port is not None else None

    def alive(self) -> bool:
        return pid_alive(self.pid, marker=_ROUTER_MODULE)

    def routes(self) -> Routes | None:
        try:
            r = requests.get(f"{self.url}{ADMIN_PREFIX}/routes", headers=self._admin_headers(), timeout=5)
            r.raise_for_status()
        except requests.RequestException as exc:
            raise ServingError(f"router for {self.model!r} at {self.url} is unreachable: {exc}") from exc
        data = r.json()
        return Routes.from_dict(data) if data else None

    def set_routes(self, routes: Routes) -> None:
        try:
            r = requests.put(f"{self.url}{ADMIN_PREFIX}/routes", json=routes.to_dict(),
                             headers=self._admin_headers(), timeout=5)
        except requests.RequestException as exc:
            raise ServingError(f"router for {self.model!r} at {self.url} is unreachable: {exc}") from exc
        if r.status_code != 200:
            raise ServingError(f"router refused routes: {r.text}")

    def stats(self, since: float = 0.0) -> dict[str, Any]:
        try:
            r = requests.get(f"{self.url}{ADMIN_PREFIX}/stats", params={"since": since},
                             headers=self._admin_headers(), timeout=10)
            r.raise_for_status()
        except requests.RequestException as exc:
            raise ServingError(f"router for {self.model!r} at {self.url} is unreachable: {exc}") from exc
        return r.json()


class LocalBackend:
    """Serves ``model`` locally: router + one server per version. Implements the engine's
    :class:`~kubeml.serving.rollout.engine.RolloutBackend` for one canary at a time.

    Typical use (what ``kubeml deploy`` does)::

        backend = LocalBackend("digits", state_dir=home / "serving", router_port=8080)
        if backend.router() is None:
            backend.deploy_stable(bundle_v1, "1")          # first version: no canary
        else:
            backend.prepare_canary(bundle_v2, "2")
            RolloutEngine(backend, policy, log).run()
    """

    def __init__(
        self,
        model: str,
        *,
        state_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        router_port: int | None = None,
        router_grpc_port: int | None = None,
        payload_sample_rate: float | None = None,
        ready_timeout_s: float = 180.0,
        batch_max_size: int | None = None,
        batch_max_latency_ms: float | None = None,
        request_timeout_s: float | None = None,
        max_concurrency: int | None = None,
        auth_token_file: str | Path | None = None,
        header_timeout_s: float | None = None,
        idle_timeout_s: int | None = None,
    ):
        self.model = model
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.host = host
        self.router_port = router_port
        self.router_grpc_port = router_grpc_port
        """gRPC port for a router this backend starts (0: any free port); None: REST only.
        A router already running keeps its own ports; version servers get gRPC ports
        whenever the model's router serves gRPC."""
        self.payload_sample_rate = payload_sample_rate
        self.ready_timeout_s = ready_timeout_s
        self.server_options: dict[str, Any] = {
            k: v
            for k, v in (
                ("batch_max_size", batch_max_size),
                ("batch_max_latency_ms", batch_max_latency_ms),
                ("request_timeout_s", request_timeout_s),
                ("max_concurrency", max_concurrency),
                ("auth_token_file", auth_token_file),
                ("header_timeout_s", header_timeout_s),
                ("idle_timeout_s", idle_timeout_s),
            )
            if v is not None
        }
        """Adaptive batching and inference deadline of every version server this backend
        starts, stable and canary alike (``ServingManager.deploy`` keywords; unset ones keep
        the server defaults)."""
        self.manager = ServingManager(self.state_dir, host=host)
        self.rollout_dir = self.state_dir / "rollouts" / model
        self.stable_version = ""
        self.canary_version = ""
        self._canary_bundle: Path | None = None
        self._canary_fault: Any = None
        self._canary: ServedModel | None = None
        router = self.router()
        if router is not None:
            routes = router.routes()
            if routes is not None:
                self.stable_version = routes.stable_version

    # -- files -------------------------------------------------------------------------------

    @property
    def decisions_file(self) -> Path:
        return self.rollout_dir / "decisions.jsonl"

    @property
    def state_file(self) -> Path:
        return self.rollout_dir / "state.json"

    @property
    def control_file(self) -> Path:
        return self.rollout_dir / "control.json"

    def _payload_log(self, version: str) -> Path | None:
        if self.payload_sample_rate is None:
            return None
        return self.state_dir / "payloads" / f"{instance_name(self.model, version)}.jsonl"

    # -- router ------------------------------------------------------------------------------

    def router(self) -> RouterProcess | None:
        """The live router for this model, or None (a dead one's record is removed)."""
        record = self.rollout_dir / "router.json"
        if not record.is_file():
            return None
        router = RouterProcess(**json.loads(record.read_text()))
        if router.alive():
            return router
        record.unlink(missing_ok=True)
        return None

    def _start_router(self, routes: Routes) -> RouterProcess:
        self.rollout_dir.mkdir(parents=True, exist_ok=True)
        port = self.router_port if self.router_port is not None else free_port(self.host)
        if not port_free(_bind_host(self.host), port):
            raise ServingError(f"port {port} on {self.host} is in use; choose another router port")
        grpc_port = self.router_grpc_port
        if grpc_port == 0:
            grpc_port = free_port(self.host)
        if grpc_port is not None and (grpc_port == port or not port_free(_bind_host(self.host), grpc_port)):
            raise ServingError(
                f"gRPC port {grpc_port} on {self.host} is in use; choose another gRPC port "
                "(serving.grpc_port in kubeml.yaml)"
            )
        routes_file = self.rollout_dir / "routes.json"
        routes_file.write_text(json.dumps(routes.to_dict(), indent=2))
        log_file = self.rollout_dir / "router.log"
        token_file = write_token_file(self.rollout_dir / "admin-token")
        cmd = [
            sys.executable, "-m", _ROUTER_MODULE, "--host", self.host, "--port", str(port),
            "--routes-file", str(routes_file), "--admin-token-file", str(token_file),
        ]  # fmt: skip
        if grpc_port is not None:
            cmd += ["--grpc-port", str(grpc_port)]
        if "header_timeout_s" in self.server_options:  # serving.header_timeout_s: the router's too
            cmd += ["--header-timeout-s", str(self.server_options["header_timeout_s"])]
        proc = spawn(cmd, log_file)
        router = RouterProcess(
            self.model, proc.pid, port, self.host, str(routes_file), str(log_file), grpc_port, str(token_file)
        )
        (self.rollout_dir / "router.json").write_text(json.dumps(router.__dict__, indent=2))
        deadline = time.monotonic() + ROUTER_READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise ServingError(
                    f"router for {self.model!r} exited with status {proc.returncode}; "
                    f"last lines of {log_file}:\n{log_tail(log_file, LOG_TAIL_LINES)}"
                )
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{router.url}{ADMIN_PREFIX}/healthz", timeout=2).ok:
                    return router
            if time.monotonic() > deadline:
                terminate_group(proc.pid, marker=_ROUTER_MODULE, grace_s=STOP_GRACE_S)
                raise ServingError(f"router for {self.model!r} did not start in time")
            time.sleep(0.1)

    def _require_router(self) -> RouterProcess:
        router = self.router()
        if router is None:
            raise ServingError(
                f"model {self.model!r} is not deployed here; deploy a first version with "
                f"`kubeml deploy {self.model} --version V`"
            )
        return router

    def _serves_grpc(self) -> bool:
        router = self.router()
        return router.grpc_port is not None if router is not None else self.router_grpc_port is not None

    def _deploy_version(self, bundle: Path, version: str, fault: Any = None) -> ServedModel:
        payload_log = self._payload_log(version)
        return self.manager.deploy(
            self.model,
            bundle,
            version=version,
            instance=instance_name(self.model, version),
            ready_timeout_s=self.ready_timeout_s,
            payload_log=payload_log,
            payload_sample_rate=self.payload_sample_rate or 1.0,
            fault=fault,
            grpc_port=free_port(self.host) if self._serves_grpc() else None,
            **self.server_options,
        )

    # -- deploy without a rollout ------------------------------------------------------------

    def deploy_stable(self, bundle: str | Path, version: str) -> RouterProcess:
        """Serve ``version`` as the only version (first deploy, or a forced replacement)."""
        if not version:
            raise ConfigError("a version label is required to deploy through the router")
        served = self._deploy_version(Path(bundle), version)
        routes = Routes(stable=served.url, stable_version=version, stable_grpc=_grpc_target(served))
        router = self.router()
        old = self.stable_version
        if router is None:
            router = self._start_router(routes)
        else:
            router.set_routes(routes)
        if old and old != version:
            self.manager.stop(instance_name(self.model, old))
        self.stable_version = version
        return router

    def stop(self) -> list[str]:
        """Stop the router and every version server of this model."""
        stopped = []
        router = self.router()
        if router is not None:
            terminate_group(router.pid, marker=_ROUTER_MODULE, grace_s=STOP_GRACE_S)
            stopped.append(f"{self.model} (router)")
        (self.rollout_dir / "router.json").unlink(missing_ok=True)
        for served in self.manager.status():
            if served.name == self.model:  # every version server of this model, by model name
                stopped += self.manager.stop(served.instance)
        return stopped

    # -- RolloutBackend ----------------------------------------------------------------------

    def prepare_canary(self, bundle: str | Path, version: str, *, fault: Any = None) -> None:
        """Choose the version the next rollout brings up (``fault``: test hook only)."""
        router = self._require_router()
        routes = router.routes()
        if routes is None:
            raise ServingError(f"router for {self.model!r} has no stable version")
        if routes.canary is not None:
            raise ServingError(
                f"model {self.model!r} already has canary version {routes.canary_version!r} "
                f"in rollout; finish it with `kubeml rollout promote|abort {self.model}`"
            )
        if version == routes.stable_version:
            raise ConfigError(f"version {version!r} of {self.model!r} is already the stable version")
        self.stable_version = routes.stable_version
        self.canary_version = version
        self._canary_bundle = Path(bundle)
        self._canary_fault = fault

    def start_canary(self) -> None:
        if self._canary_bundle is None:
            raise ServingError("no canary prepared; call prepare_canary() first")
        self._canary = self._deploy_version(self._canary_bundle, self.canary_version, self._canary_fault)

    def set_traffic(self, *, weight: int, mirror: bool) -> None:
        router = self._require_router()
        routes = router.routes()
        assert routes is not None and self._canary is not None
        router.set_routes(
            Routes(
                stable=routes.stable,
                stable_version=routes.stable_version,
                stable_grpc=routes.stable_grpc,
                canary=self._canary.url,
                canary_version=self.canary_version,
                canary_grpc=_grpc_target(self._canary),
                weight=weight,
                mirror=mirror,
                fallback=routes.fallback,
                compare_rate=routes.compare_rate,
            )
        )

    def metrics(self, since: float) -> WindowMetrics:
        stats = self._require_router().stats(since)

        def side(name: str) -> BackendMetrics:
            b = stats["backends"][name]
            return BackendMetrics(b["requests"], b["errors"], b["p50_ms"], b["p99_ms"])

        div = stats["divergence"]
        return WindowMetrics(
            stable=side("stable"),
            canary=side("canary"),
            compared=div["compared"],
            differing=div["differing"],
            window_s=stats["now"] - since,
        )

    def promote(self) -> None:
        router = self._require_router()
        routes = router.routes()
        assert routes is not None
        if routes.canary is None:
            raise ServingError(f"model {self.model!r} has no canary to promote")
        old = routes.stable_version
        router.set_routes(
            Routes(
                stable=routes.canary,
                stable_version=routes.canary_version,
                stable_grpc=routes.canary_grpc,
                fallback=routes.fallback,
                compare_rate=routes.compare_rate,
            )
        )
        self.manager.stop(instance_name(self.model, old))
        self.stable_version, self.canary_version = routes.canary_version, ""

    def rollback(self) -> None:
        router = self.router()
        version = self.canary_version
        if router is not None:
            routes = router.routes()
            if routes is not None and routes.canary is not None:
                version = version or routes.canary_version
                router.set_routes(
                    Routes(
                        stable=routes.stable,
                        stable_version=routes.stable_version,
                        stable_grpc=routes.stable_grpc,
                        fallback=routes.fallback,
                        compare_rate=routes.compare_rate,
                    )
                )
        if version:
            self.manager.stop(instance_name(self.model, version))
        self._canary = None


def _grpc_target(served: ServedModel) -> str | None:
    return f"{served.host}:{served.grpc_port}" if served.grpc_port is not None else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def engine_alive(state: dict[str, Any] | None) -> bool:
    """True when the process that runs the rollout in ``state`` is still running."""
    if not state or state.get("phase") not in ("starting", "running"):
        return False
    pid = int(state.get("pid", 0))
    return pid_alive(pid)


@dataclass(frozen=True)
class DeployOutcome:
    """What :func:`deploy_local` did."""

    model: str
    version: str
    url: str
    """The router's URL: where clients send requests, whichever version answers."""
    action: str
    """``deployed`` (first version), ``unchanged``, ``replaced`` (no analysis),
    ``promoted``, ``rolled_back`` or ``aborted``."""
    stable_version: str
    """The version serving all traffic afterwards."""
    reason: str = ""
    rollout_id: str = ""
    max_weight: int = 0
    grpc_target: str = ""
    """The router's gRPC (Open Inference Protocol V2) ``host:port``; empty: REST only."""


def deploy_local(
    model: str,
    version: str,
    bundle: str | Path,
    *,
    state_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    router_port: int | None = None,
    router_grpc_port: int | None = None,
    policy: Any = None,
    canary: bool = True,
    replay_rows: Any = None,
    replay_rate_per_s: float | None = 50.0,
    payload_sample_rate: float | None = None,
    listener: Any = None,
    fault: Any = None,
    batch_max_size: int | None = None,
    batch_max_latency_ms: float | None = None,
    request_timeout_s: float | None = None,
    max_concurrency: int | None = None,
    auth_token_file: str | Path | None = None,
    header_timeout_s: float | None = None,
    idle_timeout_s: int | None = None,
) -> DeployOutcome:
    """Deploy ``version`` of ``model`` locally; the entry point of ``kubeml deploy``.

    The first version of a model is served directly behind a new router. A later version
    goes out as a canary against the version being served and is promoted or rolled back
    by the analysis (``canary=False`` replaces the stable version without analysis).
    ``replay_rows`` (held-out features) are replayed as traffic during the rollout when
    there is no live traffic. ``fault`` is the fault-injection hook for tests.
    ``router_grpc_port`` (the config's ``serving.grpc_port``) gives a new router an Open
    Inference Protocol gRPC front and every version server a gRPC port; a router already
    running keeps the ports it was started with. ``batch_max_size`` /
    ``batch_max_latency_ms`` (adaptive batching) and ``request_timeout_s`` (inference
    deadline) and ``max_concurrency`` (the overload limit) apply to the version servers
    started here, the canary included (the config's ``serving`` keys of the same names;
    None: server defaults), as do ``auth_token_file`` (inference needs a token of that
    file; the router passes the client's ``Authorization`` through, and the replayed
    traffic sends the file's first token) and the header and idle timeouts.
    """
    from kubeml.serving.rollout.engine import DecisionLog, RolloutEngine, RolloutPolicy
    from kubeml.serving.rollout.replay import TrafficReplayer

    backend = LocalBackend(
        model,
        state_dir=state_dir,
        host=host,
        router_port=router_port,
        router_grpc_port=router_grpc_port,
        payload_sample_rate=payload_sample_rate,
        batch_max_size=batch_max_size,
        batch_max_latency_ms=batch_max_latency_ms,
        request_timeout_s=request_timeout_s,
        max_concurrency=max_concurrency,
        auth_token_file=auth_token_file,
        header_timeout_s=header_timeout_s,
        idle_timeout_s=idle_timeout_s,
    )
    router = backend.router()
    if router is None or not canary:
        action = "deployed" if router is None else "replaced"
        router = backend.deploy_stable(bundle, version)
        return DeployOutcome(model, version, router.url, action, version, grpc_target=router.grpc_target or "")
    if backend.stable_version == version:
        return DeployOutcome(
            model, version, router.url, "unchanged", version, "already the stable version",
            grpc_target=router.grpc_target or "",
        )  # fmt: skip
    backend.prepare_canary(bundle, version, fault=fault)
    traffic = None
    if replay_rows is not None:
        token = first_token(auth_token_file) if auth_token_file is not None else None
        traffic = TrafficReplayer(router.url, model, replay_rows, rate_per_s=replay_rate_per_s, token=token)
    engine = RolloutEngine(
        backend,
        policy if policy is not None else RolloutPolicy(),
        DecisionLog(backend.decisions_file, listener=listener),
        traffic=traffic,
        control_file=backend.control_file,
        state_file=backend.state_file,
    )
    backend.control_file.unlink(missing_ok=True)
    result = engine.run()
    return DeployOutcome(
        model, version, router.url, result.outcome, backend.stable_version, result.reason,
        result.rollout_id, result.max_weight, router.grpc_target or "",
    )
