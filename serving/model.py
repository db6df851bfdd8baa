"""KServe model class for kubeml bundles, and the request checks every protocol shares.

Where it sits: ``kubeml.serving.server`` owns the web side (routes, error mapping, body
limits); this module only turns decoded requests into validated feature arrays and
predictions into protocol responses. It imports no web framework, so the same class serves REST V1, REST
V2 and gRPC V2, and can be driven in-process by tests.

Request flow (kserve's ``Model.__call__``)::

    preprocess   dict (V1) | InferRequest (V2 REST/gRPC)  ->  _Batch   (all validation here)
    predict      _Batch                                   ->  _Result  (worker thread, torch)
    postprocess  _Result                                  ->  dict (V1) | InferResponse (V2)

The forward pass runs in one worker thread per model, so the event loop keeps answering
health checks and can cancel a request whose deadline passed. With adaptive batching on
(``batching=BatchingConfig(...)``, see ``batching.py``), ``predict`` queues the request's
validated rows and concurrent requests share one forward pass; each request still gets
only its own rows back, with its own id. Invalid requests never reach the queue.

Every problem with a request is raised as kserve's ``InvalidInput`` (HTTP 400, gRPC
INVALID_ARGUMENT) with a message that says what was expected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubeml.bundle import BundleSpec, load_bundle
from kubeml.serving._kserve import InferOutput, InferRequest, InferResponse, InvalidInput, kserve
from kubeml.serving.batching import AdaptiveBatcher, BatchingConfig

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "INPUT_NAME",
    "OUTPUT_PREDICTIONS",
    "OUTPUT_PROBABILITIES",
    "BundleModel",
    "InputSignature",
]

#: Name of the single V2 input tensor.
INPUT_NAME = "input"
#: V2 output holding the predicted class index per instance (INT64, shape [N]).
OUTPUT_PREDICTIONS = "predictions"
#: V2 output holding the softmax probabilities (FP32, shape [N, classes]).
OUTPUT_PROBABILITIES = "probabilities"
#: Largest batch one request may carry. 1024 digits rows are ~400 KiB of JSON and a few
#: ms of CPU for the digits CNN; bigger batches belong to batch prediction, not to a
#: latency-bound endpoint, and an unbounded batch is a cheap way to exhaust memory.
DEFAULT_MAX_BATCH_SIZE = 1024

# OIP datatype -> numpy dtype, for the numeric types a feature tensor can have.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
}


@dataclass(frozen=True)
class InputSignature:
    """What one request must look like; built from a bundle's spec."""

    shape: tuple[int, ...]
    """Shape of one instance, without the batch dimension, e.g. ``(64,)``."""
    datatype: str = "FP32"
    """OIP datatype V2 clients must declare; V1 numbers are converted to it."""
    minimum: float | None = None
    """Smallest accepted feature value (None: unbounded)."""
    maximum: float | None = None
    """Largest accepted feature value (None: unbounded)."""
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    """Most instances per request."""
    name: str = INPUT_NAME

    def __post_init__(self) -> None:
        if self.datatype not in _NUMPY_DTYPES:
            raise ValueError(
                f"input datatype {self.datatype!r} is not supported; "
                f"use one of {', '.join(sorted(_NUMPY_DTYPES))}"
            )
        if not self.shape or any(d < 1 for d in self.shape):
            raise ValueError(f"input shape must be non-empty positive sizes, got {self.shape}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")

    @classmethod
    def from_spec(
        cls, spec: BundleSpec, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    ) -> InputSignature:
        return cls(
            shape=tuple(spec.input_shape),
            datatype=spec.input_dtype,
            minimum=spec.input_min,
            maximum=spec.input_max,
            max_batch_size=max_batch_size,
        )

    @property
    def numpy_dtype(self) -> np.dtype:
        return _NUMPY_DTYPES[self.datatype]

    @property
    def instance_size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        """Human-readable form used in error messages, e.g. ``FP32 [N, 64]``."""
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.datatype} [N, {dims}] with 1 <= N <= {self.max_batch_size}"

    # -- request parsing ------------------------------------------------------------------

    def features_from_v1(self, body: Any) -> np.ndarray:
        """Validate a V1 body ``{"instances": [...]}``; return an ``(N, *shape)`` array."""
        hint = f'expected a JSON object {{"instances": [...]}} holding {self.describe()}'
        if not isinstance(body, Mapping):
            raise InvalidInput(f"request body is not a JSON object; {hint}")
        if "instances" not in body:
            raise InvalidInput(f'request has no "instances" field; {hint}')
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput(f'"instances" must be a non-empty list; {hint}')
        self._check_batch(len(instances))
        try:
            # float64 first: every JSON number fits, and NaN/inf/range checks then see
            # the value the client sent rather than a rounded or wrapped one.
            array = np.asarray(instances, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(
                f'"instances" must be equally long lists of numbers; {hint}'
            ) from None
        if array.shape != (len(instances), *self.shape):
            raise InvalidInput(
                f'"instances" has shape {list(array.shape)}; {hint}'
            )
        return self._finish(array)

    def features_from_v2(self, request: InferRequest) -> np.ndarray:
        """Validate a V2 request (REST or gRPC); return an ``(N, *shape)`` array."""
        inputs = request.inputs or []
        if len(inputs) != 1:
            raise InvalidInput(
                f"expected exactly 1 input tensor named {self.name!r}, got {len(inputs)}"
            )
        tensor = inputs[0]
        if tensor.name != self.name:
            raise InvalidInput(f"unknown input {tensor.name!r}; the model's input is {self.name!r}")
        if tensor.datatype != self.datatype:
            raise InvalidInput(
                f"input {self.name!r} has datatype {tensor.datatype!r}; expected {self.describe()}"
            )
        shape = tensor.shape
        if (
            not isinstance(shape, (list, tuple))
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or len(shape) != 1 + len(self.shape)
            or tuple(shape[1:]) != self.shape
        ):
            shown = list(shape) if isinstance(shape, (list, tuple)) else shape
            raise InvalidInput(
                f"input {self.name!r} has shape {shown!r}; expected {self.describe()}"
            )
        batch = shape[0]
        self._check_batch(batch)
        expected = batch * self.instance_size
        dtype = self.numpy_dtype
        raw = getattr(tensor, "_raw_data", None)  # gRPC raw_input_contents
        try:
            if raw is not None:
                if len(raw) != expected * dtype.itemsize:
                    raise InvalidInput(
                        f"input {self.name!r} carries {len(raw)} bytes; shape {list(shape)} "
                        f"of {self.datatype} needs {expected * dtype.itemsize}"
                    )
                array = np.frombuffer(raw, dtype=dtype)
            else:
                data = tensor.data
                if isinstance(data, np.ndarray):
                    array = data
                else:
                    array = np.asarray(data if data is not None else [], dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(
                f"input {self.name!r} data must be numbers (flat or nested row-major lists)"
            ) from None
        if array.size != expected:
            raise InvalidInput(
                f"input {self.name!r} holds {array.size} values; "
                f"shape {list(shape)} needs {expected}"
            )
        if array.dtype == object:
            raise InvalidInput(f"input {self.name!r} data must be numbers")
        return self._finish(array.reshape(batch, *self.shape))

    def _check_batch(self, n: int) -> None:
        if n < 1 or n > self.max_batch_size:
            raise InvalidInput(
                f"batch size {n} is out of range: send 1..{self.max_batch_size} instances "
                "per request (split larger batches)"
            )

    def _finish(self, array: np.ndarray) -> np.ndarray:
        """Check values, then convert to the model's dtype."""
        values = array.astype(np.float64, copy=False)
        bad = ~np.isfinite(values)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidInput(f"input contains NaN or infinity (first at index {list(index)})")
        if self.minimum is not None and values.min() < self.minimum:
            raise InvalidInput(
                f"input value {values.min():g} is below the minimum {self.minimum:g} "
                f"this model was trained on"
            )
        if self.maximum is not None and values.max() > self.maximum:
            raise InvalidInput(
                f"input value {values.max():g} is above the maximum {self.maximum:g} "
                f"this model was trained on"
            )
        return np.ascontiguousarray(array, dtype=self.numpy_dtype)


@dataclass(frozen=True)
class _Batch:
    features: np.ndarray
    request: InferRequest | None  # None for V1


@dataclass(frozen=True)
class _Result:
    batch: _Batch
    predictions: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N, classes]


class BundleModel(kserve.Model):
    """Serves one kubeml model bundle (``model.safetensors`` + ``kubeml-model.json``).

    ``ready`` turns true only when :meth:`load` has finished, so a server can accept
    connections (liveness) while a large model is still loading (readiness).

    >>> model = BundleModel("digits", "/nonexistent/bundle")
    >>> model.ready
    False
    """

    def __init__(
        self,
        name: str,
        bundle_dir: str | Path,
        *,
        version: str = "",
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batching: BatchingConfig | None = None,
    ):
        super().__init__(name)
        self.bundle_dir = Path(bundle_dir)
        self.version = version
        self.max_batch_size = max_batch_size
        """Most instances one request may carry (checked before any batching)."""
        self.batching = batching
        """Adaptive batching across requests; None runs each request on its own."""
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._batcher: AdaptiveBatcher | None = None
        self.spec: BundleSpec | None = None
        self.signature: InputSignature | None = None
        self._module: Any = None
        self._torch: Any = None
        self._load_lock = threading.Lock()
        #: Optional :class:`~kubeml.serving.telemetry.ModelTelemetry` (set by the server):
        #: receives each batch's predictions for the batch-size and prediction metrics.
        self.telemetry: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> bool:
        """Load weights and spec; idempotent and safe to call from a loader thread."""
        with self._load_lock:
            if self.ready:
                return True
            import torch

            module, spec = load_bundle(self.bundle_dir)
            self.signature = InputSignature.from_spec(spec, max_batch_size=self.max_batch_size)
            self.spec = spec
            self._module = module
            self._torch = torch
            self.ready = True
            return True

    def start(self) -> None:
        # kserve's base class marks a model ready on start(); readiness here means loaded.
        pass

    def stop(self) -> None:
        self.ready = False
        self._shutdown_workers()
        self._module = None

    def _shutdown_workers(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- metadata (V2 model metadata endpoint) ----------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        if self.signature is None:
            return []
        return [
            {
                "name": self.signature.name,
                "datatype": self.signature.datatype,
                "shape": [-1, *self.signature.shape],
            }
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        if self.spec is None:
            return []
        return [
            {"name": OUTPUT_PREDICTIONS, "datatype": "INT64", "shape": [-1]},
            {
                "name": OUTPUT_PROBABILITIES,
                "datatype": "FP32",
                "shape": [-1, len(self.spec.classes)],
            },
        ]

    # -- inference --------------------------------------------------------------------------

    def validate(self, payload: Any) -> Any:
        # preprocess already validated against the model's own signature, which is
        # stricter than kserve's generic check (and that check cannot read _Batch).
        return payload

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> _Batch:
        if self.signature is None:  # only reachable if a caller bypasses the readiness check
            raise InvalidInput(f"model {self.name!r} is not loaded yet; retry when it is ready")
        if isinstance(payload, InferRequest):
            if payload.request_outputs:
                known = {OUTPUT_PREDICTIONS, OUTPUT_PROBABILITIES}
                for requested in payload.request_outputs:
                    if requested.name not in known:
                        raise InvalidInput(
                            f"unknown output {requested.name!r}; "
                            f"outputs are {sorted(known)}"
                        )
            return _Batch(self.signature.features_from_v2(payload), payload)
        if isinstance(payload, (bytes, bytearray, str)):
            raise InvalidInput(
                "request body must be JSON (Content-Type: application/json) like "
                '{"instances": [[...], ...]}'
            )
        return _Batch(self.signature.features_from_v1(payload), None)

    async def predict(self, payload: _Batch, headers: dict[str, str] | None = None) -> _Result:
        if self.batching is not None:
            if self._batcher is None:
                self._batcher = AdaptiveBatcher(
                    self._infer,
                    max_batch_size=self.batching.max_batch_size,
                    max_latency_ms=self.batching.max_latency_ms,
                    executor=self._inference_executor(),
                    name=self.name,
                )
            predictions, probabilities = await self._batcher.submit(payload.features)
        else:
            loop = asyncio.get_running_loop()
            predictions, probabilities = await loop.run_in_executor(
                self._inference_executor(), self._infer, payload.features
            )
        return _Result(payload, predictions, probabilities)

    def _inference_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # One thread: torch and ONNX Runtime already spread one forward pass over every
        # core, and concurrent passes would only contend for them. Requests queue here (or
        # in the batcher) instead; a cancelled request that has not started never runs.
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"kubeml-infer-{self.name}"
            )
        return self._executor

    def _infer(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass over ``features`` (one request, or a coalesced batch of
        several); reports the pass's size and predicted classes to telemetry."""
        predictions, probabilities = self._forward(features)
        if self.telemetry is not None:
            self.telemetry.observe_batch(predictions)
        return predictions, probabilities

    def _forward(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predictions int64 [N], probabilities float32 [N, classes])``; runtimes override."""
        torch = self._torch
        with torch.inference_mode():
            logits = self._module(torch.from_numpy(features).float())
            probabilities = torch.softmax(logits, dim=1)
        probs = probabilities.numpy().astype(np.float32, copy=False)
        return probs.argmax(axis=1).astype(np.int64), probs

    async def postprocess(
        self, result: _Result, headers: dict[str, str] | None = None, response_headers=None
    ) -> dict[str, Any] | InferResponse:
        request = result.batch.request
        if request is None:
            return {
                "predictions": result.predictions.tolist(),
                "probabilities": result.probabilities.tolist(),
            }
        n = len(result.predictions)
        predictions, probabilities = result.predictions, result.probabilities
        if request.from_grpc:
            # kserve's gRPC encoder tests ``output.data`` for truth, which numpy arrays
            # refuse; lists take the same path and are encoded identically.
            predictions, probabilities = predictions.tolist(), probabilities.ravel().tolist()
        outputs = [
            InferOutput(OUTPUT_PREDICTIONS, [n], "INT64", data=predictions),
            InferOutput(
                OUTPUT_PROBABILITIES,
                [n, result.probabilities.shape[1]],
                "FP32",
                data=probabilities,
            ),
        ]
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=self.version or None,
            infer_outputs=outputs,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
            from_grpc=request.from_grpc,
        )

    def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        raise InvalidInput(
            f"model {self.name!r} has no explainer; use :predict (V1) or /infer (V2)"
        )

    # -- in-process use ---------------------------------------------------------------------

    def predict_array(self, features: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validate ``features`` (N, *input shape) and run them in-process.

        Returns ``(predictions, probabilities)``; the same checks and the same code path
        as a served request, without HTTP. Loads the bundle on first use.
        """
        if not self.ready:
            self.load()
        assert self.signature is not None
        rows = {"instances": np.asarray(features).tolist()}
        return self._infer(self.signature.features_from_v1(rows))
