"""Model server process: one kubeml bundle behind KServe's ``ModelServer``.

Run as::

    python -m kubeml.serving.server --model-dir DIR --model-name NAME \\
        [--model-version V] --http-port P [--grpc-port G]

Where it sits: this is the only serving package that touches the web layer (the rollout
router has its own, in ``kubeml.serving.rollout``; what both speak is in
``kubeml.serving.protocol``). It keeps kserve's REST (V1 + Open Inference Protocol V2) and
optional gRPC servers, and closes the gaps where kserve answers a client mistake with a
5xx or no JSON:

* request parsing failures inside kserve's decoder (``KeyError`` on a missing field, a
  ``ValueError`` from a bad binary header, ...) become 400s (``_dataplane.py``);
* FastAPI's 422 validation errors, unknown routes (404) and wrong methods (405) answer
  with the same ``{"error": "..."}`` body as every other error;
* bodies above ``--max-body-bytes`` get a 413 before they are buffered, and JSON nested
  deeply enough to exhaust the parser's recursion gets a 400 (``_app.py``);
* ``/v2/models/NAME/versions/V/...`` is answered for the served version (kserve itself
  answers 501 for any versioned route) and 404 for any other version.

Multi-model mode (``--models-dir DIR [--max-memory-mb M]``) serves every bundle under
``DIR/NAME/``, loaded and unloaded through the V2 model repository API with
least-recently-used eviction under the memory cap (see ``repository.py``). ``--runtime
onnx`` serves a bundle's ``model.onnx`` with ONNX Runtime instead of PyTorch eager.

Every inference request is timed and counted per model, version and protocol on
``/metrics`` (gRPC ``ModelInfer`` calls too, as protocol ``grpc``), may be sampled to a
payload log (``--payload-log``), and carries an ``x-request-id`` (``kubeml.serving.telemetry``).
``--fault-error-rate`` / ``--fault-latency-ms`` are a fault-injection hook for rollout
tests: they make a healthy model look like a bad version. Injected errors answer at once
(HTTP 503, gRPC ``UNAVAILABLE``); the injected latency counts as inference time, so
``--request-timeout-s`` cuts it short like a slow forward pass.

Inference runs in a worker thread, under a deadline: ``--request-timeout-s`` (default
30 s, 0 = none), or a shorter one a client sends as ``x-request-timeout-ms`` (or Envoy's
``x-envoy-expected-rq-timeout-ms``). A request past its deadline gets 504 with the usual
``{"error": "..."}`` body (gRPC: ``DEADLINE_EXCEEDED``), is counted as a 504 on
``/metrics``, and the server keeps answering health checks and other requests meanwhile.

Adaptive batching (single-model mode, off by default): ``--batch-max-size N
[--batch-max-latency-ms T]`` queues validated requests to the model and runs them
together, up to ``N`` instances summed over requests per forward pass, flushed when full
or when the oldest has waited ``T`` ms (``batching.py``). V1, V2 and gRPC requests share
the queue; each gets back only its own rows and id, and ``kubeml_batch_size`` records
the coalesced passes. ``--max-batch-size`` stays the per-request limit on instances.

The model loads in a background thread: the port opens at once (liveness) and
``/v2/health/ready`` and ``/v2/models/NAME/ready`` turn 200 only after the weights are
loaded. A bundle that cannot be loaded stops the process with exit status 1 and the
reason in the log.

Modules, from the bottom: ``_limits`` (constants, deadlines and the bundle preflight; no
kserve), ``_dataplane`` (kserve's data plane with the rules above), ``_grpc`` (the gRPC
server and its telemetry interceptor), ``_kserve`` (the ``ModelServer`` subclass and the
two kserve globals kubeml reads), ``_app`` (routes, middleware, :func:`build_server`),
``_run`` (:func:`serve`, :func:`serve_repository`) and ``__main__`` (the command line).
Importing this package loads only ``_limits`` and ``_run``; kserve and torch load when a
server is started.
"""

from __future__ import annotations

from typing import Any

from kubeml.serving.server._limits import (
    CLIENT_TIMEOUT_HEADERS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    _request_budget_s,
)
from kubeml.serving.server._run import serve, serve_repository

__all__ = [
    "CLIENT_TIMEOUT_HEADERS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "main",
    "serve",
    "serve_repository",
]

# doctest.testmod(kubeml.serving.server) runs the examples of the package's parts too.
__test__ = {"_request_budget_s": _request_budget_s}


def __getattr__(name: str) -> Any:
    # ``main`` lives in __main__.py; importing that module eagerly here would make
    # ``python -m kubeml.serving.server`` find it already imported and run it twice.
    if name == "main":
        from kubeml.serving.server.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
