"""A small HTTP client for kubeml model servers, and the deploy stage's smoke test.

Speaks plain JSON over REST (V1 ``:predict`` and Open Inference Protocol V2 ``/infer``),
so it needs only ``requests``; for binary tensors or gRPC use a standard OIP client such
as ``tritonclient``. Errors the server returns keep their HTTP status
(:class:`ServingRequestError`), so callers can tell "bad input" (4xx) from "server down".
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from kubeml.errors import ServingError, ServingRequestError

__all__ = ["ModelClient", "Prediction", "ServingRequestError", "SmokeReport", "smoke_test"]

#: Seconds per HTTP request. Inference on the served models takes milliseconds; a
#: request that takes this long means the server is stuck, not busy.
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Prediction:
    """What the server answered for a batch."""

    predictions: tuple[int, ...]
    """Predicted class index per instance."""
    probabilities: tuple[tuple[float, ...], ...]
    """Class probabilities per instance."""
    model_version: str | None = None
    """Version that answered (V2 only; V1 responses do not carry it)."""


class ModelClient:
    """Client for one model on one server.

    >>> client = ModelClient("http://127.0.0.1:1", "digits", timeout=0.5)
    >>> client.ready()
    False
    """

    def __init__(self, url: str, model_name: str, *, timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None):
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.timeout = timeout
        self._session = requests.Session()
        if token:  # servers started with --auth-token-file want it on every inference call
            self._session.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def for_served(cls, served: Any, *, timeout: float = DEFAULT_TIMEOUT_S) -> ModelClient:
        """Client for a :class:`~kubeml.serving.manager.ServedModel`."""
        return cls(served.url, served.name, timeout=timeout)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health and metadata ---------------------------------------------------------------

    def live(self) -> bool:
        return self._ok("GET", "/v2/health/live")

    def ready(self) -> bool:
        """True when the model is loaded and answers (``/v2/models/NAME/ready`` is 200)."""
        return self._ok("GET", f"/v2/models/{self.model_name}/ready")

    def wait_ready(self, timeout_s: float = 60.0, *, interval_s: float = 0.25) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServingError(
                    f"model {self.model_name!r} at {self.url} was not ready after {timeout_s:g} s"
                )
            time.sleep(interval_s)

    def metadata(self) -> dict[str, Any]:
        """V2 model metadata: name, versions, platform, inputs and outputs."""
        return self._json("GET", f"/v2/models/{self.model_name}")

    # -- inference -------------------------------------------------------------------------

    def v1_predict(self, instances: Any) -> Prediction:
        """POST ``{"instances": ...}`` to ``/v1/models/NAME:predict``."""
        body = {"instances": _as_lists(instances)}
        answer = self._json("POST", f"/v1/models/{self.model_name}:predict", json=body)
        return Prediction(
            predictions=tuple(int(p) for p in answer["predictions"]),
            probabilities=tuple(tuple(row) for row in answer.get("probabilities", ())),
        )

    def v2_infer(
        self, instances: Any, *, input_name: str = "input", datatype: str = "FP32"
    ) -> Prediction:
        """POST an OIP V2 JSON request with one ``(N, ...)`` input tensor."""
        array = np.asarray(instances)
        body = {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "data": array.reshape(-1).tolist(),
                }
            ]
        }
        answer = self._json("POST", f"/v2/models/{self.model_name}/infer", json=body)
        outputs = {o["name"]: o for o in answer.get("outputs", [])}
        try:
            preds = outputs["predictions"]["data"]
            probs = outputs["probabilities"]
        except KeyError as exc:
            raise ServingError(f"V2 response has no output {exc}; got {sorted(outputs)}") from None
        classes = probs["shape"][1]
        flat = probs["data"]
        return Prediction(
            predictions=tuple(int(p) for p in preds),
            probabilities=tuple(
                tuple(flat[i * classes : (i + 1) * classes]) for i in range(len(preds))
            ),
            model_version=answer.get("model_version"),
        )

    # -- plumbing --------------------------------------------------------------------------

    def _ok(self, method: str, path: str) -> bool:
        try:
            return self._session.request(method, self.url + path, timeout=self.timeout).ok
        except requests.RequestException:
            return False

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServingError(f"cannot reach model server at {self.url}: {exc}") from exc
        if not r.ok:
            try:
                detail = r.json().get("error", r.text)
            except ValueError:
                detail = r.text
            raise ServingRequestError(
                f"{method} {path} failed with {r.status_code}: {detail}", r.status_code
            )
        return r.json()


def _as_lists(instances: Any) -> Any:
    return np.asarray(instances).tolist() if not isinstance(instances, list) else instances


@dataclass(frozen=True)
class SmokeReport:
    """Outcome of :func:`smoke_test`."""

    model_name: str
    model_version: str | None
    instances: int
    predictions: tuple[int, ...]
    v1_latency_ms: float
    v2_latency_ms: float
    accuracy: float | None = None
    """Share of ``expected`` labels predicted correctly, when labels were given."""


def smoke_test(
    url: str,
    model_name: str,
    instances: Sequence[Sequence[float]] | np.ndarray,
    *,
    expected: Sequence[int] | None = None,
    min_accuracy: float | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    token: str | None = None,
) -> SmokeReport:
    """Check a freshly deployed server end to end; raise ``ServingError`` if it fails.

    Checks that the model is ready, that its V2 metadata matches the instances' shape,
    that V1 and V2 return the same predictions with probabilities summing to 1, and (with
    ``expected`` and ``min_accuracy``) that accuracy on the instances is high enough.
    """
    array = np.asarray(instances, dtype=np.float64)
    with ModelClient(url, model_name, timeout=timeout, token=token) as client:
        if not client.ready():
            raise ServingError(f"model {model_name!r} at {url} is not ready")
        meta = client.metadata()
        declared = meta["inputs"][0]["shape"][1:]
        if list(array.shape[1:]) != declared:
            raise ServingError(
                f"model {model_name!r} expects instances of shape {declared}, "
                f"smoke-test data has {list(array.shape[1:])}"
            )
        t0 = time.perf_counter()
        v1 = client.v1_predict(array)
        t1 = time.perf_counter()
        v2 = client.v2_infer(array)
        t2 = time.perf_counter()
    if v1.predictions != v2.predictions:
        raise ServingError(
            f"model {model_name!r}: V1 and V2 predictions differ ({v1.predictions[:10]} vs "
            f"{v2.predictions[:10]}...)"
        )
    for row in v2.probabilities:
        if not math.isclose(sum(row), 1.0, abs_tol=1e-3):
            raise ServingError(f"model {model_name!r}: probabilities sum to {sum(row)}, not 1")
    accuracy = None
    if expected is not None:
        if len(expected) != len(v2.predictions):
            raise ServingError(
                f"{len(expected)} expected labels for {len(v2.predictions)} instances"
            )
        accuracy = sum(int(p == e) for p, e in zip(v2.predictions, expected)) / len(expected)
        if min_accuracy is not None and accuracy < min_accuracy:
            raise ServingError(
                f"model {model_name!r}: smoke-test accuracy {accuracy:.3f} is below "
                f"{min_accuracy:.3f}"
            )
    return SmokeReport(
        model_name=model_name,
        model_version=v2.model_version,
        instances=len(v2.predictions),
        predictions=v2.predictions,
        v1_latency_ms=(t1 - t0) * 1000,
        v2_latency_ms=(t2 - t1) * 1000,
        accuracy=accuracy,
    )
