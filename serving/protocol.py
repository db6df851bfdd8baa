"""Wire conventions shared by the model server and the rollout router.

Where it sits: below both ``kubeml.serving.server`` (REST and gRPC of one model) and
``kubeml.serving.rollout`` (the router's REST proxy and gRPC front), so neither imports
the other. It holds what the two must agree on:

* the JSON error body every kubeml endpoint answers with, ``{"error": "..."}``, and the
  one plain-ASGI sender of it (:func:`send_json_error`);
* the HTTP status a gRPC status code stands for (:data:`GRPC_HTTP_STATUS`,
  :func:`grpc_http_status`): the Open Inference Protocol's own REST/gRPC mapping plus
  gateway codes, so that REST and gRPC requests are counted in one set of statuses.

It imports no web or RPC framework: codes are matched by name or number, so the table is
usable where ``grpc`` is not imported (the ASGI middleware, the model classes' telemetry).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = [
    "GRPC_HTTP_STATUS",
    "error_body",
    "grpc_http_status",
    "redact",
    "send_json_error",
]

#: gRPC status code name -> (its number, the HTTP status it counts as). The numbers are
#: the ones every gRPC implementation uses (``grpc.StatusCode.X.value[0]``).
GRPC_HTTP_STATUS: dict[str, tuple[int, int]] = {
    "OK": (0, 200),
    "CANCELLED": (1, 499),
    "UNKNOWN": (2, 500),
    "INVALID_ARGUMENT": (3, 400),
    "DEADLINE_EXCEEDED": (4, 504),
    "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409),
    "PERMISSION_DENIED": (7, 403),
    "RESOURCE_EXHAUSTED": (8, 429),
    "FAILED_PRECONDITION": (9, 400),
    "ABORTED": (10, 409),
    "OUT_OF_RANGE": (11, 400),
    "UNIMPLEMENTED": (12, 501),
    "INTERNAL": (13, 500),
    "UNAVAILABLE": (14, 503),
    "DATA_LOSS": (15, 500),
    "UNAUTHENTICATED": (16, 401),
}
_BY_NUMBER = {number: status for number, status in GRPC_HTTP_STATUS.values()}


def grpc_http_status(code: Any) -> int:
    """The HTTP status a gRPC status code stands for; 500 for a code nobody defined.

    ``code`` is a ``grpc.StatusCode``, its number (``grpc.aio`` contexts report either)
    or its name.

    >>> grpc_http_status("UNAVAILABLE"), grpc_http_status(4), grpc_http_status(99)
    (503, 504, 500)
    """
    if isinstance(code, int):
        return _BY_NUMBER.get(code, 500)
    name = code if isinstance(code, str) else getattr(code, "name", "")
    return GRPC_HTTP_STATUS.get(name, (0, 500))[1]


#: A filesystem path inside an error message: an absolute path of two or more parts that is
#: not one of the served URL trees; and the lines of a Python traceback.
_FS_PATH = re.compile(r"(?<![\w:/.])/(?!(?:v1|v2|-|metrics)\b)[\w.@~+-]+(?:/[\w.@~+-]*)+")
_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]*", line \d+')


def redact(message: str) -> str:
    """``message`` without filesystem paths or traceback lines: what a client may be told.

    >>> redact("bundle /srv/models/digits/3/model.onnx is missing")
    'bundle <path> is missing'
    >>> redact("POST /v2/models/digits/infer is not routed")
    'POST /v2/models/digits/infer is not routed'
    """
    return _TRACEBACK.sub("<traceback>", _FS_PATH.sub("<path>", message))


def error_body(message: str) -> bytes:
    """The JSON error body of every kubeml endpoint, paths and tracebacks redacted.

    >>> error_body("model digits is not loaded")
    b'{"error": "model digits is not loaded"}'
    """
    return json.dumps({"error": redact(message)}).encode()


async def send_json_error(send: Any, status: int, message: str) -> None:
    """Answer an ASGI HTTP request with ``status`` and :func:`error_body` ``(message)``."""
    body = error_body(message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
