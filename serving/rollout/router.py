"""The local traffic router: one HTTP endpoint in front of a stable and a canary server.

Run as::

    python -m kubeml.serving.rollout.router --port P --routes-file FILE --admin-token-file T [--grpc-port G]

Where it sits: the rollout engine's local backend starts one router per model and steers
it through a small admin API; clients only ever see the router's port(s). It imports
neither kserve nor torch (it starts in about a second) and never parses a REST request
body: inference requests are forwarded as bytes. With ``--grpc-port`` it also answers the
Open Inference Protocol V2 over gRPC (``grpc_front.py``) with the same routes, the same
traffic modes and into the same statistics, so the engine's analysis sees both protocols.

Traffic modes (see :class:`Routes`):

* split: each inference request goes to the canary with probability ``weight``/100, else
  to stable. A canary answer of 5xx (or no answer) is retried once on stable when
  ``fallback`` is on, so users see stable's answer while the failure still counts
  against the canary.
* mirror (shadow): every request is answered by stable; a copy goes to the canary in the
  background and its answer is only measured and compared.

Prediction divergence: for a share (``compare_rate``) of the requests the canary answers
(or shadows), the same body is also sent to the other side and the predicted classes are
compared; the divergence is the share of instances whose classes differ.

Admin API (JSON), every route but ``healthz`` behind ``Authorization: Bearer TOKEN``
(the token in ``--admin-token-file``; 401 without it)::

    GET  /-/rollout/routes          current Routes
    PUT  /-/rollout/routes          replace Routes (validated; 400 with the reason)
    GET  /-/rollout/stats?since=T   per-backend requests, errors, p50/p99 since unix time T,
                                    divergence since T, and totals since start
    GET  /-/rollout/healthz         200 once a stable backend is set; names the gRPC port

Only the Open Inference Protocol's data-plane paths are forwarded (:data:`FORWARDED`:
inference, model metadata and readiness, server health and metadata); anything else, the
model repository API above all, is answered 404 by the router itself.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hmac
import json
import logging
import random
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubeml._files import atomic_write_text
from kubeml.serving.protocol import error_body

__all__ = ["ADMIN_PREFIX", "FORWARDED", "Routes", "forwarded", "main"]

log = logging.getLogger("kubeml.serving.rollout.router")

ADMIN_PREFIX = "/-/rollout"
#: Per-request records kept for windowed statistics. At a few hundred requests per second
#: locally this spans several minutes, far longer than an analysis interval (seconds).
WINDOW_RECORDS = 200_000
#: Background (shadow or comparison) requests in flight at most; beyond it copies are
#: skipped, so a slow canary cannot pile up memory or starve the stable path.
MAX_BACKGROUND = 64
#: Seconds a backend may take to answer one inference request.
UPSTREAM_TIMEOUT_S = 30.0
# Headers a model server needs to decode a request / a client needs to decode an answer.
# "authorization": inference credentials are the client's own; the servers check them
# (the router holds no inference token and cannot widen anyone's access).
_FORWARD_REQUEST = ("content-type", "inference-header-content-length", "x-request-id", "accept", "authorization")
_FORWARD_RESPONSE = ("content-type", "inference-header-content-length", "x-request-id", "x-kubeml-deadline")


@dataclass(frozen=True)
class Routes:
    """Where traffic goes. Frozen: the router swaps the whole object atomically."""

    stable: str
    """Base URL of the stable server, e.g. ``http://127.0.0.1:8001``."""
    stable_version: str = ""
    canary: str | None = None
    """Base URL of the canary server; None when no rollout is in progress."""
    canary_version: str = ""
    stable_grpc: str | None = None
    """gRPC target (``host:port``) of the stable server; None when it serves no gRPC."""
    canary_grpc: str | None = None
    """gRPC target of the canary server; None when there is no canary or it serves no gRPC."""
    weight: int = 0
    """Percent of inference requests the canary answers (split mode), 0..100."""
    mirror: bool = False
    """Shadow mode: stable answers everything, the canary gets copies."""
    fallback: bool = True
    """Retry a canary 5xx or connection failure on stable (idempotent inference only)."""
    compare_rate: float = 1.0
    """Share of canary-answered (or shadowed) requests also sent to the other side to
    measure prediction divergence; 0 turns divergence off."""

    def __post_init__(self) -> None:
        if not self.stable.startswith(("http://", "https://")):
            raise ValueError(f"stable must be an http(s) URL, got {self.stable!r}")
        if self.canary is not None and not self.canary.startswith(("http://", "https://")):
            raise ValueError(f"canary must be an http(s) URL or null, got {self.canary!r}")
        if not 0 <= self.weight <= 100:
            raise ValueError(f"weight must be a percentage 0..100, got {self.weight}")
        if not 0.0 <= self.compare_rate <= 1.0:
            raise ValueError(f"compare_rate must be in [0, 1], got {self.compare_rate}")
        if self.canary is None and (self.weight or self.mirror):
            raise ValueError("weight and mirror need a canary URL")
        if self.canary is None and self.canary_grpc is not None:
            raise ValueError("canary_grpc needs a canary URL (the canary's REST endpoint)")
        for name in ("stable_grpc", "canary_grpc"):
            target = getattr(self, name)
            if target is not None and not _is_grpc_target(target):
                raise ValueError(f"{name} must be a host:port gRPC target or null, got {target!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Routes:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown route fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_grpc_target(target: str) -> bool:
    host, sep, port = target.rpartition(":")
    return bool(sep and host and "/" not in target and port.isdigit() and 0 < int(port) < 65536)


#: (method, path pattern) pairs the router forwards to a model server: the V1 and V2
#: data planes of one model. The repository API, /metrics and the docs are not among them.
FORWARDED: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern)) for method, pattern in (
        ("POST", r"/v2/models/[^/]+(/versions/[^/]+)?/infer"),
        ("POST", r"/v1/models/[^/:]+:predict"),
        ("GET", r"/v2/models/[^/]+(/versions/[^/]+)?(/ready)?"),
        ("GET", r"/v1/models/[^/:]+"),
        ("GET", r"/v2/health/(live|ready)"),
        ("GET", r"/v2"),
        ("GET", r"/"),
    )
)


def forwarded(method: str, path: str) -> bool:
    """True when the router forwards ``method path`` to a model server.

    >>> forwarded("POST", "/v2/models/digits/infer"), forwarded("POST", "/v2/repository/models/digits/unload")
    (True, False)
    """
    return any(method == m and pattern.fullmatch(path) for m, pattern in FORWARDED)


def _is_inference(method: str, path: str) -> bool:
    return method == "POST" and (path.endswith("/infer") or path.endswith(":predict"))


def _predictions(body: bytes) -> list | None:
    """Predicted classes from a V1 or V2 JSON answer, or None if it has none."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(answer, dict):
        return None
    if isinstance(answer.get("predictions"), list):
        return answer["predictions"]
    for output in answer.get("outputs") or ():
        if isinstance(output, dict) and output.get("name") == "predictions":
            data = output.get("data")
            return data if isinstance(data, list) else None
    return None


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


class _Stats:
    """Per-request records in time order, plus totals since the router started."""

    def __init__(self) -> None:
        self.requests: deque[tuple[float, str, int, float]] = deque(maxlen=WINDOW_RECORDS)
        self.compared: deque[tuple[float, int, int]] = deque(maxlen=WINDOW_RECORDS)
        self.totals = {b: {"requests": 0, "errors": 0} for b in ("stable", "canary")}
        self.fallbacks = 0
        self.skipped_background = 0
        self.rejected = 0
        """Requests the router answered itself as malformed (gRPC bodies that are not the
        method's protobuf message); they reach no backend and are in no backend's counts."""

    def record(self, backend: str, status: int, latency_s: float) -> None:
        self.requests.append((time.time(), backend, status, latency_s))
        self.totals[backend]["requests"] += 1
        if status >= 500:
            self.totals[backend]["errors"] += 1

    def record_comparison(self, instances: int, differing: int) -> None:
        self.compared.append((time.time(), instances, differing))

    def summary(self, since: float) -> dict[str, Any]:
        times = [r[0] for r in self.requests]
        recent = list(self.requests)[bisect.bisect_left(times, since) :]
        backends = {}
        for name in ("stable", "canary"):
            rows = [r for r in recent if r[1] == name]
            errors = sum(1 for r in rows if r[2] >= 500)
            client_errors = sum(1 for r in rows if 400 <= r[2] < 500)
            latencies = sorted(r[3] * 1000 for r in rows)
            backends[name] = {
                "requests": len(rows),
                "errors": errors,
                "client_errors": client_errors,
                "error_rate": errors / len(rows) if rows else 0.0,
                "p50_ms": round(_quantile(latencies, 0.50), 3),
                "p99_ms": round(_quantile(latencies, 0.99), 3),
            }
        compared = [c for c in self.compared if c[0] >= since]
        instances = sum(c[1] for c in compared)
        differing = sum(c[2] for c in compared)
        return {
            "since": since,
            "now": time.time(),
            "backends": backends,
            "divergence": {
                "compared": instances,
                "differing": differing,
                "rate": differing / instances if instances else 0.0,
            },
            "totals": {k: dict(v) for k, v in self.totals.items()},
            "fallbacks": self.fallbacks,
            "skipped_background": self.skipped_background,
            "rejected": self.rejected,
        }


class Router:
    """The aiohttp application behind the router process."""

    def __init__(
        self,
        routes: Routes | None,
        *,
        routes_file: Path | None = None,
        seed: int | None = None,
        grpc_host: str = "127.0.0.1",
        grpc_port: int | None = None,
        admin_token: str | None = None,
    ):
        self.routes = routes
        self.admin_token = admin_token
        """Bearer token of the admin API. None leaves it open: only for a router built
        in-process by a test; the router's command line requires a token file."""
        self.routes_file = routes_file
        self.stats = _Stats()
        self._random = random.Random(seed)
        self._background: set[asyncio.Task] = set()
        self._session: Any = None
        self.grpc_host = grpc_host
        self.grpc_port = grpc_port
        """Port of the gRPC front; None: REST only. 0 picks a free port at start."""
        self._grpc: Any = None

    # -- application -------------------------------------------------------------------------

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._admin_guard])
        app.router.add_route("GET", f"{ADMIN_PREFIX}/routes", self._get_routes)
        app.router.add_route("PUT", f"{ADMIN_PREFIX}/routes", self._put_routes)
        app.router.add_route("GET", f"{ADMIN_PREFIX}/stats", self._get_stats)
        app.router.add_route("GET", f"{ADMIN_PREFIX}/healthz", self._healthz)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: Any) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S),
            auto_decompress=False,
        )
        if self.grpc_port is not None:
            from kubeml.serving.rollout.grpc_front import GrpcFront

            self._grpc = GrpcFront(self)
            self.grpc_port = await self._grpc.start(self.grpc_host, self.grpc_port)
            log.info("gRPC (Open Inference Protocol V2) on %s:%d", self.grpc_host, self.grpc_port)

    async def _stop(self, _app: Any) -> None:
        if self._grpc is not None:
            await self._grpc.stop()
        for task in list(self._background):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    # -- admin -------------------------------------------------------------------------------

    @property
    def _admin_guard(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def guard(request: Any, handler: Any) -> Any:
            path = request.path
            if path.startswith(ADMIN_PREFIX + "/") and path != f"{ADMIN_PREFIX}/healthz" and self.admin_token:
                given = request.headers.get("Authorization", "")
                expected = f"Bearer {self.admin_token}"
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    return web.json_response(
                        {"error": "the router's admin API needs its bearer token (Authorization: Bearer ...)"},
                        status=401, headers={"WWW-Authenticate": 'Bearer realm="kubeml-router"'},
                    )
            return await handler(request)

        return guard

    async def _get_routes(self, _request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.routes.to_dict() if self.routes else None)

    async def _put_routes(self, request: Any) -> Any:
        from aiohttp import web

        try:
            routes = Routes.from_dict(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": f"invalid routes: {exc}"}, status=400)
        self.routes = routes
        if self._grpc is not None:
            self._grpc.routes_changed(routes)
        if self.routes_file is not None:
            atomic_write_text(self.routes_file, json.dumps(routes.to_dict(), indent=2), fsync=False)
        log.info("routes: %s", routes.to_dict())
        return web.json_response(routes.to_dict())

    async def _get_stats(self, request: Any) -> Any:
        from aiohttp import web

        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since must be a unix time"}, status=400)
        summary = self.stats.summary(since)
        summary["routes"] = self.routes.to_dict() if self.routes else None
        return web.json_response(summary)

    async def _healthz(self, _request: Any) -> Any:
        from aiohttp import web

        ok = self.routes is not None
        return web.json_response({"ready": ok, "grpc_port": self.grpc_port}, status=200 if ok else 503)

    # -- proxy -------------------------------------------------------------------------------

    async def _forward(self, base: str, request: Any, body: bytes) -> tuple[int, bytes, dict]:
        import aiohttp

        headers = {k: request.headers[k] for k in _FORWARD_REQUEST if k in request.headers}
        try:
            async with self._session.request(
                request.method, base + request.path_qs, data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                out = {k: upstream.headers[k] for k in _FORWARD_RESPONSE if k in upstream.headers}
                return upstream.status, payload, out
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            error = error_body(f"backend {base} unavailable: {type(exc).__name__}")
            return 502, error, {"content-type": "application/json"}

    async def _timed(self, backend: str, base: str, request: Any, body: bytes) -> tuple[int, bytes, dict]:
        started = time.perf_counter()
        status, payload, headers = await self._forward(base, request, body)
        # A 504 on the client's own deadline is not the backend's failure (see the server's
        # x-kubeml-deadline header): counted as 499, like the server's own metrics do.
        counted = 499 if status == 504 and headers.get("x-kubeml-deadline") == "client" else status
        self.stats.record(backend, counted, time.perf_counter() - started)
        return status, payload, headers

    def to_canary(self, routes: Routes) -> bool:
        """Whether this inference request goes to the canary (split mode's weighted draw)."""
        return (
            routes.canary is not None
            and not routes.mirror
            and routes.weight > 0
            and (routes.weight >= 100 or self._random.random() * 100 < routes.weight)
        )

    def compare_now(self, routes: Routes) -> bool:
        """Whether this answered request is also sent to the other side to be compared."""
        return self._random.random() < routes.compare_rate

    def _in_background(self, coro: Any) -> None:
        if len(self._background) >= MAX_BACKGROUND:
            self.stats.skipped_background += 1
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _compare(
        self, routes: Routes, request: Any, body: bytes, answered: bytes, answered_by: str
    ) -> None:
        """Send ``body`` to the side that did not answer and compare predicted classes."""
        other = "stable" if answered_by == "canary" else "canary"
        base = routes.stable if other == "stable" else routes.canary
        assert base is not None
        if other == "canary":  # a shadow copy is canary traffic and is measured as such
            status, payload, _ = await self._timed("canary", base, request, body)
        else:  # a comparison copy to stable is not user traffic: not counted
            status, payload, _ = await self._forward(base, request, body)
        if status != 200:
            return
        mine, theirs = _predictions(answered), _predictions(payload)
        if mine is None or theirs is None or len(mine) != len(theirs):
            return
        self.stats.record_comparison(len(mine), sum(1 for a, b in zip(mine, theirs) if a != b))

    def _response(self, status: int, payload: bytes, headers: dict, backend: str, version: str) -> Any:
        from aiohttp import web

        headers = {**headers, "x-kubeml-backend": backend}
        if version:
            headers["x-kubeml-model-version"] = version
        return web.Response(status=status, body=payload, headers=headers)

    async def _proxy(self, request: Any) -> Any:
        from aiohttp import web

        routes = self.routes  # one snapshot per request: a PUT mid-request changes nothing
        if routes is None:
            return web.json_response({"error": "router has no stable backend yet"}, status=503)
        if not forwarded(request.method, request.path):
            return web.json_response(
                {"error": f"{request.method} {request.path} is not routed: the router forwards only "
                          "the inference data plane (V1/V2 infer, model metadata, readiness, health)"},
                status=404,
            )
        body = await request.read()
        if not _is_inference(request.method, request.path):
            status, payload, headers = await self._forward(routes.stable, request, body)
            return self._response(status, payload, headers, "stable", routes.stable_version)

        if self.to_canary(routes):
            assert routes.canary is not None
            status, payload, headers = await self._timed("canary", routes.canary, request, body)
            if status < 500:
                if status == 200 and self.compare_now(routes):
                    self._in_background(self._compare(routes, request, body, payload, "canary"))
                return self._response(status, payload, headers, "canary", routes.canary_version)
            if not routes.fallback:
                return self._response(status, payload, headers, "canary", routes.canary_version)
            self.stats.fallbacks += 1

        status, payload, headers = await self._timed("stable", routes.stable, request, body)
        if (
            routes.mirror
            and routes.canary is not None
            and status == 200
        ):
            if self.compare_now(routes):
                self._in_background(self._compare(routes, request, body, payload, "stable"))
            else:
                self._in_background(self._timed("canary", routes.canary, request, body))
        return self._response(status, payload, headers, "stable", routes.stable_version)


#: aiohttp has no header timeout of its own; its keep-alive deadline also runs from the moment
#: a connection opens until a whole request has arrived, so it serves as one: a client that
#: dribbles its headers (or sends none) is disconnected after this many seconds. The same
#: deadline then closes connections idle between requests.
HEADER_TIMEOUT_S = 10.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kubeml.serving.rollout.router",
        description="Route inference traffic between a stable and a canary model server.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--routes-file",
        type=Path,
        required=True,
        help="JSON Routes read at start and rewritten on every change",
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        required=True,
        help="file holding the bearer token of the admin API (/-/rollout/*; healthz stays open)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve Open Inference Protocol V2 gRPC on this port (routes' *_grpc targets)",
    )
    p.add_argument(
        "--header-timeout-s",
        type=float,
        default=HEADER_TIMEOUT_S,
        help="seconds a client has to send its first request on a connection, and that an idle "
        f"kept-alive connection stays open (default {HEADER_TIMEOUT_S:g}): slowloris clients are cut off",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.header_timeout_s > 0:
        parser.error(f"--header-timeout-s must be positive, got {args.header_timeout_s}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from aiohttp import web

    routes = None
    if args.routes_file.is_file():
        try:
            routes = Routes.from_dict(json.loads(args.routes_file.read_text()))
        except (ValueError, TypeError) as exc:
            log.error("%s: invalid routes: %s", args.routes_file, exc)
            return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # optional: plain asyncio is ~30% slower, still correct
        pass
    try:
        token = args.admin_token_file.read_text().strip()
    except OSError as exc:
        log.error("admin token file %s: %s", args.admin_token_file, exc)
        return 2
    if len(token) < 16:
        log.error("admin token in %s is shorter than 16 characters", args.admin_token_file)
        return 2
    router = Router(routes, routes_file=args.routes_file, grpc_host=args.host, grpc_port=args.grpc_port,
                    admin_token=token)
    # access_log=None: one line per request would cost more than the routing itself.
    web.run_app(
        router.app(), host=args.host, port=args.port, access_log=None, print=None,
        shutdown_timeout=5.0, keepalive_timeout=args.header_timeout_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
