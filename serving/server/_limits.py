"""Limits and checks of the model server that need neither kserve nor torch.

Where it sits: the light bottom of ``kubeml.serving.server``. The package ``__init__``,
the command line (``__main__.py``) and :func:`~kubeml.serving.server._run.serve` use it
before anything heavy is imported, so a broken bundle or a bad flag fails in milliseconds;
the data plane (``_dataplane.py``) applies :func:`_request_budget_s` to every inference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kubeml._files import sha256_file
from kubeml.bundle import SPEC_FILE, WEIGHTS_FILE, read_spec
from kubeml.config import DEFAULT_REQUEST_TIMEOUT_S
from kubeml.errors import BundleError

__all__ = [
    "CLIENT_DEADLINE_HEADER",
    "CLIENT_TIMEOUT_HEADERS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "EXIT_LOAD_FAILED",
    "GRACE_PERIOD_S",
    "MIN_CLIENT_TIMEOUT_MS",
    "OVERLOAD_RETRY_AFTER_S",
    "RUNTIMES",
]

#: Largest request body accepted. A full batch of 1024 digits rows is ~400 KiB as JSON
#: (~256 KiB binary); 4 MiB leaves room for wider models while keeping a single request
#: from buffering unbounded memory in the server.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
#: Seconds uvicorn waits for in-flight requests on SIGTERM. Requests here take
#: milliseconds; a short grace keeps redeploys and ``kubeml serve stop`` quick.
GRACE_PERIOD_S = 5
#: Exit status when the bundle cannot be loaded (distinct from a crash or a signal).
EXIT_LOAD_FAILED = 1
#: Model runtimes ``--runtime`` accepts: PyTorch eager (safetensors) or ONNX Runtime (model.onnx).
RUNTIMES = ("pytorch", "onnx")
#: Request headers carrying a client's own deadline in milliseconds; only a shorter one
#: than ``--request-timeout-s`` has an effect. Envoy (Istio, Knative) sends the second.
CLIENT_TIMEOUT_HEADERS = ("x-request-timeout-ms", "x-envoy-expected-rq-timeout-ms")


def _preflight(model_dir: Path, runtime: str = "pytorch") -> None:
    """Fail in milliseconds, before kserve and torch are imported, on a broken bundle."""
    spec = read_spec(model_dir)
    if runtime == "onnx":
        if not (model_dir / "model.onnx").is_file():
            raise BundleError(f"{model_dir}: model.onnx is missing (export it with export_onnx)")
        return
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{model_dir}: {WEIGHTS_FILE} is missing")
    if spec.weights_sha256 and sha256_file(weights) != spec.weights_sha256:
        raise BundleError(
            f"{weights}: checksum mismatch with {SPEC_FILE} (truncated or modified file)"
        )


#: Inference requests one server works on at once; the next one is answered 503 with
#: Retry-After at once instead of queueing without bound. 64 keeps a batching window full
#: (the default batch is 1024 instances, of any number of requests) while a CPU-bound
#: digits server at 2 cores answers them within the default deadline.
DEFAULT_MAX_CONCURRENCY = 64
#: Seconds a refused client is told to wait (Retry-After).
OVERLOAD_RETRY_AFTER_S = 1

#: Shortest client deadline honoured, in ms; a shorter one is raised to it. Below this no
#: model answers even on an idle server, so a tinier deadline is a way to mint 504s, not a
#: wish a server can meet.
MIN_CLIENT_TIMEOUT_MS = 10.0
#: Response header on a 504 whose deadline was the client's own: the telemetry counts it
#: under status 499 (a client-imposed limit), never as a server error a rollout judges.
CLIENT_DEADLINE_HEADER = "x-kubeml-deadline"


def _request_budget_s(
    headers: dict[str, str] | None, server_timeout_s: float
) -> tuple[float | None, str]:
    """``(seconds, where the limit comes from)`` for one inference; ``(None, "")``: none.

    >>> _request_budget_s({"x-request-timeout-ms": "250"}, 30.0)
    (0.25, 'x-request-timeout-ms header')
    >>> _request_budget_s({"x-request-timeout-ms": "60000"}, 30.0)
    (30.0, '--request-timeout-s')
    >>> _request_budget_s({}, 0.0)
    (None, '')
    >>> _request_budget_s({"x-request-timeout-ms": "0.001"}, 30.0)  # raised to the floor
    (0.01, 'x-request-timeout-ms header')
    """
    budget, source = (server_timeout_s, "--request-timeout-s") if server_timeout_s else (None, "")
    for name in CLIENT_TIMEOUT_HEADERS:
        raw = headers.get(name) if headers else None
        if raw is None:
            continue
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(
                f"{name} header must be a positive number of milliseconds, got {raw!r}"
            )
        ms = max(ms, MIN_CLIENT_TIMEOUT_MS)
        if budget is None or ms / 1000 < budget:
            budget, source = ms / 1000, f"{name} header"
    return budget, source


def _check_timeouts(request_timeout_s: float, batching: Any) -> None:
    if not math.isfinite(request_timeout_s) or request_timeout_s < 0:
        raise ValueError(
            f"request timeout must be >= 0 seconds (0: none), got {request_timeout_s}"
        )
    if batching is not None and request_timeout_s and (
        batching.max_latency_ms / 1000 >= request_timeout_s
    ):
        raise ValueError(
            f"batch max latency {batching.max_latency_ms:g} ms is not below the request "
            f"timeout {request_timeout_s:g} s: requests would time out waiting for a batch; "
            "lower --batch-max-latency-ms or raise --request-timeout-s"
        )
