"""Adaptive batching and request deadlines: the batcher alone, the model in-process, and
real server processes (one with batching on, one whose inference is slower than its
request timeout)."""

from __future__ import annotations

import asyncio
import doctest
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import kubeml.serving.batching
import kubeml.serving.server
from kubeml.serving import ServedModel, ServingManager
from kubeml.serving.batching import AdaptiveBatcher, BatchFailed, BatchingConfig
from kubeml.serving.model import BundleModel
from kubeml.serving.server import _request_budget_s
from tests.conftest import free_port
from kubeml.serving.telemetry import FaultInjection, ModelTelemetry
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput

# A batched forward pass sums in another order than a one-request pass: probabilities
# differ in the last bits (~2e-8 seen on the digits CNN); predicted classes never do.
PROB_ATOL = 1e-6


def _rows(request: int, n: int, width: int = 3) -> np.ndarray:
    """``n`` rows whose values say which request and which row they are."""
    return np.array([[request * 1000 + row] * width for row in range(n)], dtype=np.float64)


class _Recorder:
    """A ``run`` for the batcher: echoes rows (and their sums) and remembers batch sizes."""

    def __init__(self, fail_on: float | None = None, delay_s: float = 0.0):
        self.sizes: list[int] = []
        self.first_values: list[list[float]] = []
        self.fail_on = fail_on
        self.delay_s = delay_s

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.sizes.append(len(x))
        self.first_values.append(x[:, 0].tolist())
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ArithmeticError(f"poisoned row {self.fail_on:g}")
        return x.copy(), x.sum(axis=1)


# -- the batcher -------------------------------------------------------------------------


def test_concurrent_requests_coalesce_and_each_gets_its_own_rows_in_order():
    run = _Recorder()
    batcher = AdaptiveBatcher(run, max_batch_size=64, max_latency_ms=50)
    sizes = [1, 3, 2, 4, 1, 5, 2, 3, 1, 2]
    requests_ = [_rows(i, n) for i, n in enumerate(sizes)]

    async def burst():
        return await asyncio.gather(*(batcher.submit(r) for r in requests_))

    results = asyncio.run(burst())
    assert run.sizes == [sum(sizes)]  # one forward pass for all ten requests
    for sent, (echo, sums) in zip(requests_, results, strict=True):
        np.testing.assert_array_equal(echo, sent)
        np.testing.assert_array_equal(sums, sent.sum(axis=1))
    assert (batcher.batches_run, batcher.rows_run) == (1, sum(sizes))


def test_full_batch_runs_without_waiting_for_max_latency():
    run = _Recorder()
    batcher = AdaptiveBatcher(run, max_batch_size=8, max_latency_ms=60_000)

    async def eight_rows():
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit(_rows(i, 2)) for i in range(4)))
        return time.perf_counter() - started

    assert asyncio.run(eight_rows()) < 5.0  # not the 60 s max latency
    assert run.sizes == [8]


def test_lone_request_waits_max_latency_then_runs():
    run = _Recorder()
    batcher = AdaptiveBatcher(run, max_batch_size=100, max_latency_ms=150)

    async def one():
        started = time.perf_counter()
        await batcher.submit(_rows(0, 1))
        return time.perf_counter() - started

    elapsed = asyncio.run(one())
    assert 0.14 <= elapsed < 2.0
    assert run.sizes == [1]


def test_max_latency_counts_from_the_oldest_request():
    run = _Recorder()
    batcher = AdaptiveBatcher(run, max_batch_size=100, max_latency_ms=400)

    async def staggered():
        started = time.perf_counter()
        first = asyncio.ensure_future(batcher.submit(_rows(0, 1)))
        await asyncio.sleep(0.3)
        second = asyncio.ensure_future(batcher.submit(_rows(1, 1)))
        await asyncio.gather(first, second)
        return time.perf_counter() - started

    elapsed = asyncio.run(staggered())
    # Flushed ~400 ms after the first request, not 400 ms after the second (~700 ms).
    assert 0.39 <= elapsed < 0.65
    assert run.sizes == [2]


def test_batches_never_split_a_request_nor_exceed_max_size():
    run = _Recorder()
    batcher = AdaptiveBatcher(run, max_batch_size=10, max_latency_ms=20)
    sizes = np.random.default_rng(3).integers(1, 7, size=40).tolist()
    requests_ = [_rows(i, n) for i, n in enumerate(sizes)]

    async def burst():
        return await asyncio.gather(*(batcher.submit(r) for r in requests_))

    results = asyncio.run(burst())
    assert all(size <= 10 for size in run.sizes)
    assert sum(run.sizes) == sum(sizes)
    assert len(run.sizes) < len(sizes)
    # Batches are whole requests in arrival order: their first values concatenate back.
    flat = [v for batch in run.first_values for v in batch]
    assert flat == [v for r in requests_ for v in r[:, 0].tolist()]
    for sent, (echo, _) in zip(requests_, results, strict=True):
        np.testing.assert_array_equal(echo, sent)


def test_request_larger_than_max_batch_size_runs_alone_and_whole():
    run = _Recorder()
    batcher = AdaptiveBatcher(run, max_batch_size=4, max_latency_ms=10)
    requests_ = [_rows(0, 3), _rows(1, 9), _rows(2, 2)]

    async def burst():
        return await asyncio.gather(*(batcher.submit(r) for r in requests_))

    results = asyncio.run(burst())
    assert run.sizes == [3, 9, 2]
    for sent, (echo, _) in zip(requests_, results, strict=True):
        np.testing.assert_array_equal(echo, sent)


def test_failing_batch_fails_only_its_members_and_the_batcher_carries_on():
    run = _Recorder(fail_on=1000.0)  # request 1's first row
    batcher = AdaptiveBatcher(run, max_batch_size=4, max_latency_ms=20)
    # 2 + 2 rows fill the first batch; the next two requests form the second.
    requests_ = [_rows(0, 2), _rows(1, 2), _rows(2, 2), _rows(3, 2)]

    async def burst():
        return await asyncio.gather(
            *(batcher.submit(r) for r in requests_), return_exceptions=True
        )

    results = asyncio.run(burst())
    assert run.sizes == [4, 4]
    for failed in results[:2]:
        assert isinstance(failed, BatchFailed)
        assert "batch of 4 rows from 2 requests" in str(failed)
        assert "ArithmeticError: poisoned row 1000" in str(failed)
        assert isinstance(failed.__cause__, ArithmeticError)
    for sent, result in zip(requests_[2:], results[2:], strict=True):
        np.testing.assert_array_equal(result[0], sent)

    async def later():
        return await batcher.submit(_rows(5, 1))

    np.testing.assert_array_equal(asyncio.run(later())[0], _rows(5, 1))


def test_run_returning_the_wrong_row_count_fails_the_batch_with_a_clear_error():
    batcher = AdaptiveBatcher(lambda x: (x[:1],), max_batch_size=8, max_latency_ms=5)

    async def two():
        return await asyncio.gather(
            batcher.submit(_rows(0, 2)), batcher.submit(_rows(1, 1)), return_exceptions=True
        )

    for failed in asyncio.run(two()):
        assert isinstance(failed, BatchFailed)
        assert "expected 3 rows" in str(failed)


def test_request_cancelled_while_queued_never_reaches_the_model():
    run = _Recorder()
    batcher = AdaptiveBatcher(run, max_batch_size=100, max_latency_ms=300)

    async def one_gives_up():
        impatient = asyncio.wait_for(batcher.submit(_rows(0, 5)), timeout=0.05)
        patient = batcher.submit(_rows(1, 2))
        return await asyncio.gather(impatient, patient, return_exceptions=True)

    gave_up, answered = asyncio.run(one_gives_up())
    assert isinstance(gave_up, TimeoutError)
    np.testing.assert_array_equal(answered[0], _rows(1, 2))
    assert run.sizes == [2]


def test_request_cancelled_while_its_batch_runs_leaves_the_others_their_answers():
    run = _Recorder(delay_s=0.3)
    batcher = AdaptiveBatcher(run, max_batch_size=3, max_latency_ms=1000)

    async def burst():
        impatient = asyncio.wait_for(batcher.submit(_rows(0, 1)), timeout=0.1)
        others = [batcher.submit(_rows(i, 1)) for i in (1, 2)]
        return await asyncio.gather(impatient, *others, return_exceptions=True)

    gave_up, *answered = asyncio.run(burst())
    assert isinstance(gave_up, TimeoutError)
    assert run.sizes == [3]
    for i, result in zip((1, 2), answered, strict=True):
        np.testing.assert_array_equal(result[0], _rows(i, 1))


def test_closed_batcher_fails_queued_requests_and_refuses_new_ones():
    batcher = AdaptiveBatcher(_Recorder(), max_batch_size=10, max_latency_ms=10_000)

    async def close_while_queued():
        queued = asyncio.ensure_future(batcher.submit(_rows(0, 1)))
        await asyncio.sleep(0.01)
        batcher.close()
        with pytest.raises(RuntimeError, match="stopped before this request ran"):
            await queued
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.submit(_rows(1, 1))

    asyncio.run(close_while_queued())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 0}, "max size must be >= 1"),
        ({"max_batch_size": 4, "max_latency_ms": -1}, "max latency"),
        ({"max_batch_size": 4, "max_latency_ms": float("nan")}, "max latency"),
    ],
)
def test_batching_config_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchingConfig(**kwargs)


def test_submit_rejects_an_empty_request():
    batcher = AdaptiveBatcher(_Recorder(), max_batch_size=4)
    with pytest.raises(ValueError, match="at least one row"):
        asyncio.run(batcher.submit(np.zeros((0, 3))))


@pytest.mark.parametrize("module", [kubeml.serving.batching, kubeml.serving.server])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_request_budget_rejects_a_garbage_client_deadline():
    with pytest.raises(ValueError, match="positive number of milliseconds"):
        _request_budget_s({"x-request-timeout-ms": "soon"}, 30.0)
    with pytest.raises(ValueError, match="x-envoy-expected-rq-timeout-ms"):
        _request_budget_s({"x-envoy-expected-rq-timeout-ms": "-5"}, 30.0)
    assert _request_budget_s({"x-envoy-expected-rq-timeout-ms": "15000"}, 0.0) == (
        15.0,
        "x-envoy-expected-rq-timeout-ms header",
    )


# -- the model, in-process ----------------------------------------------------------------


def test_model_validates_before_queueing_so_a_bad_request_fails_alone(digits_bundle, digits_rows):
    model = BundleModel(
        "digits-batched-inproc", digits_bundle, batching=BatchingConfig(64, max_latency_ms=50)
    )
    model.load()
    model.telemetry = ModelTelemetry(model.name, "1")
    labels = {"model": model.name, "version": "1"}
    good_v1 = {"instances": digits_rows[:2].tolist()}
    bad_v1 = {"instances": [[99.0] * 64]}  # above the trained range
    good_v2 = InferRequest(
        model.name,
        [InferInput("input", [3, 64], "FP32", data=digits_rows[2:5].ravel().tolist())],
        request_id="mine",
    )

    async def together():
        return await asyncio.gather(
            model(good_v1), model(bad_v1), model(good_v2), return_exceptions=True
        )

    try:
        (v1, _), bad, (v2, _) = asyncio.run(together())
    finally:
        model.stop()
    assert isinstance(bad, InvalidInput) and "above the maximum" in str(bad)
    expected, expected_probs = BundleModel("ref", digits_bundle).predict_array(digits_rows)
    assert v1["predictions"] == expected[:2].tolist()
    np.testing.assert_allclose(v1["probabilities"], expected_probs[:2], atol=PROB_ATOL, rtol=0)
    assert v2.id == "mine"
    outputs = {o.name: o for o in v2.outputs}
    assert np.asarray(outputs["predictions"].data).tolist() == expected[2:5].tolist()
    # One forward pass of the 5 valid rows, and the histogram saw exactly that.
    assert REGISTRY.get_sample_value("kubeml_batch_size_count", labels) == 1
    assert REGISTRY.get_sample_value("kubeml_batch_size_sum", labels) == 5


# -- real servers -----------------------------------------------------------------------------

VERSION = "4"
BATCH_LATENCY_MS = 100
SLOW_TIMEOUT_S = 1.0
SLOW_FAULT_MS = 5000


@pytest.fixture(scope="module")
def batched(manager: ServingManager, digits_bundle: Path) -> ServedModel:
    return manager.deploy(
        "digits", digits_bundle, version=VERSION, instance="digits-batched",
        grpc_port=free_port(), batch_max_size=64, batch_max_latency_ms=BATCH_LATENCY_MS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def slow(manager: ServingManager, digits_bundle: Path) -> ServedModel:
    """Inference takes 5 s (injected) against a 1 s request timeout."""
    return manager.deploy(
        "digits", digits_bundle, version=VERSION, instance="digits-slow",
        grpc_port=free_port(), request_timeout_s=SLOW_TIMEOUT_S,
        fault=FaultInjection(latency_ms=SLOW_FAULT_MS),
    )  # fmt: skip


def _metrics(server: ServedModel) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def _grpc_infer(server: ServedModel, rows: np.ndarray, request_id: str, **kwargs):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    request = pb.ModelInferRequest(
        model_name="digits",
        id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(rows.shape))],
        raw_input_contents=[rows.astype(np.float32).tobytes()],
    )  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, **kwargs)
    outputs = [o.name for o in response.outputs]
    raw = response.raw_output_contents
    predictions = np.frombuffer(raw[outputs.index("predictions")], dtype=np.int64)
    probabilities = np.frombuffer(raw[outputs.index("probabilities")], dtype=np.float32)
    return response.id, predictions, probabilities.reshape(len(rows), -1)


def test_32_concurrent_requests_batched_answer_like_unbatched_and_metrics_show_it(
    batched, digits_bundle
):
    rng = np.random.default_rng(11)
    sends = [rng.integers(0, 17, size=(int(rng.integers(1, 4)), 64)).astype(np.float32) for _ in range(32)]
    reference = BundleModel("ref", digits_bundle)  # the unbatched path, one request per pass
    expected = [reference.predict_array(rows) for rows in sends]
    labels = {"model": "digits", "version": VERSION}
    before = _metrics(batched)
    start = threading.Barrier(32)

    def send(i: int):
        rows = sends[i]
        start.wait()
        if i % 3 == 0:
            r = requests.post(batched.v1_url, json={"instances": rows.tolist()}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            return None, np.array(body["predictions"]), np.array(body["probabilities"])
        if i % 3 == 1:
            request = {
                "id": f"req-{i}",
                "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}],
            }  # fmt: skip
            r = requests.post(batched.v2_url, json=request, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            out = {o["name"]: o for o in body["outputs"]}
            return (
                body["id"],
                np.array(out["predictions"]["data"]),
                np.reshape(out["probabilities"]["data"], out["probabilities"]["shape"]),
            )
        return _grpc_infer(batched, rows, f"req-{i}")

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, range(32)))

    for i, ((request_id, predictions, probabilities), (want, want_probs)) in enumerate(
        zip(answers, expected, strict=True)
    ):
        if i % 3:
            assert request_id == f"req-{i}"
        np.testing.assert_array_equal(predictions, want)
        np.testing.assert_allclose(probabilities, want_probs, atol=PROB_ATOL, rtol=0)

    after = _metrics(batched)
    passes = _sample(after, "kubeml_batch_size_count", **labels) - _sample(before, "kubeml_batch_size_count", **labels)
    rows = _sample(after, "kubeml_batch_size_sum", **labels) - _sample(before, "kubeml_batch_size_sum", **labels)
    up_to_4 = (
        _sample(after, "kubeml_batch_size_bucket", le="4.0", **labels)
        - _sample(before, "kubeml_batch_size_bucket", le="4.0", **labels)
    )
    assert rows == sum(len(r) for r in sends)
    assert passes < 32  # fewer forward passes than requests
    assert passes - up_to_4 >= 1  # a pass of more than 4 rows: no single request has 4


def test_request_past_a_client_deadline_gets_504_while_the_server_keeps_serving(batched, digits_rows):
    labels = {"model": "digits", "version": VERSION, "protocol": "v1", "status": "504"}
    before = _sample(_metrics(batched), "kubeml_requests_total", **labels)
    # A lone request waits the 100 ms batch latency, so a 20 ms deadline always passes.
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(
            requests.post, batched.v1_url, json={"instances": digits_rows[:1].tolist()},
            headers={"x-request-timeout-ms": "20"}, timeout=30,
        )  # fmt: skip
        health = requests.get(f"{batched.url}/v2/health/ready", timeout=10)
        r = late.result()
    assert health.status_code == 200
    assert r.status_code == 504
    assert r.headers["content-type"].startswith("application/json")
    assert "within 0.02 s (the x-request-timeout-ms header)" in r.json()["error"]
    ok = requests.post(batched.v1_url, json={"instances": digits_rows[:1].tolist()}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
    assert _sample(_metrics(batched), "kubeml_requests_total", **labels) == before + 1


def test_inference_slower_than_request_timeout_gets_504_json_and_server_stays_healthy(slow, digits_rows):
    body = {"instances": digits_rows[:1].tolist()}

    def infer() -> tuple[requests.Response, float]:
        r = requests.post(slow.v1_url, json=body, timeout=30)
        return r, time.perf_counter()

    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        late = pool.submit(infer)
        time.sleep(0.1)  # the request is in flight, waiting on the slow model
        health = requests.get(f"{slow.url}/v2/health/ready", timeout=10)
        health_answered = time.perf_counter()
        r, late_answered = late.result()
    assert health.status_code == 200 and health.json() == {"ready": True}
    assert health_answered < late_answered  # answered while the inference was stuck
    assert r.status_code == 504, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert f"did not finish within {SLOW_TIMEOUT_S:g} s (the --request-timeout-s)" in error
    assert SLOW_TIMEOUT_S <= late_answered - started < SLOW_FAULT_MS / 1000  # cut short
    v2 = requests.post(
        slow.v2_url,
        json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digits_rows[0].tolist()}]},
        timeout=30,
    )  # fmt: skip
    assert v2.status_code == 504 and "error" in v2.json()
    # Still healthy afterwards: live, ready, metadata, and 504s counted per protocol.
    assert requests.get(f"{slow.url}/v2/health/live", timeout=10).status_code == 200
    assert requests.get(f"{slow.url}/v2/models/digits", timeout=10).json()["versions"] == [VERSION]
    metrics = _metrics(slow)
    for protocol in ("v1", "v2"):
        labels = {"model": "digits", "version": VERSION, "protocol": protocol, "status": "504"}
        assert _sample(metrics, "kubeml_requests_total", **labels) >= 1


def test_grpc_inference_past_the_request_timeout_is_deadline_exceeded(slow, digits_rows):
    import grpc

    labels = {"model": "digits", "version": VERSION, "protocol": "grpc", "status": "504"}
    before = _sample(_metrics(slow), "kubeml_requests_total", **labels)
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        _grpc_infer(slow, digits_rows[:1], "late")
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--request-timeout-s" in err.value.details()
    assert time.perf_counter() - started < SLOW_FAULT_MS / 1000
    # Counted like HTTP's 504, under protocol grpc.
    assert _sample(_metrics(slow), "kubeml_requests_total", **labels) == before + 1


def test_bad_client_deadline_header_is_a_400(batched, digits_rows):
    r = requests.post(
        batched.v1_url, json={"instances": digits_rows[:1].tolist()},
        headers={"x-request-timeout-ms": "later"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 400
    assert "positive number of milliseconds" in json.loads(r.text)["error"]


# -- batching and timeouts from kubeml.yaml ----------------------------------------------


def _server_args(server: ServedModel) -> list[str]:
    """The command line the version server process runs with."""
    return Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_kubeml_deploy_starts_version_servers_with_the_configs_batching_and_timeout(
    project: Path, digits_bundle: Path, digits_rows
):
    """``serving.batch_max_size`` / ``batch_max_latency_ms`` / ``request_timeout_s`` in
    kubeml.yaml reach the stable server ``kubeml deploy`` starts and a canary."""
    from typer.testing import CliRunner

    from kubeml.cli import app
    from kubeml.config import load_config
    from kubeml.serving.rollout import LocalBackend
    from kubeml.testing.serving import register_bundle
    from tests.conftest import free_port, write_config

    serving = {"http_port": free_port(), "grpc_port": free_port(), "batch_max_size": 16,
               "batch_max_latency_ms": 150, "request_timeout_s": 7.5}  # fmt: skip
    write_config(project, {"serving": serving})
    cfg = load_config("kubeml.yaml", "dev")
    register_bundle(cfg, digits_bundle, model="digits")  # --bundle serves a registered version's bundle
    state = Path(cfg.home) / "serving"
    try:
        result = CliRunner().invoke(app, ["deploy", "digits", "--version", "1", "--bundle", str(digits_bundle), "--no-replay"])
        assert result.exit_code == 0, result.output
        assert f"gRPC 127.0.0.1:{serving['grpc_port']}" in result.output
        stable = {s.version: s for s in ServingManager(state).status()}["1"]
        args = _server_args(stable)
        assert (_flag(args, "--batch-max-size"), _flag(args, "--batch-max-latency-ms"), _flag(args, "--request-timeout-s")) == (
            "16", "150.0", "7.5"
        )  # fmt: skip
        # Batching is on: a lone request through the router waits out the batch latency.
        started = time.perf_counter()
        r = requests.post(f"http://127.0.0.1:{serving['http_port']}/v1/models/digits:predict",
                          json={"instances": digits_rows[:1].tolist()}, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        assert time.perf_counter() - started >= 0.14
        labels = {"model": "digits", "version": "1"}
        assert _sample(_metrics(stable), "kubeml_batch_size_count", **labels) == 1

        backend = LocalBackend("digits", state_dir=state, **cfg.serving.server_options())
        backend.prepare_canary(digits_bundle, "2")
        backend.start_canary()
        canary = {s.version: s for s in ServingManager(state).status()}["2"]
        canary_args = _server_args(canary)
        assert [_flag(canary_args, f) for f in ("--batch-max-size", "--batch-max-latency-ms", "--request-timeout-s")] == [
            "16", "150.0", "7.5"
        ]  # fmt: skip
        assert _flag(canary_args, "--grpc-port") is not None  # the router serves gRPC
        backend.rollback()
    finally:
        LocalBackend("digits", state_dir=state).stop()


def test_kubeml_deploy_without_batching_keys_keeps_the_server_defaults(project: Path, digits_bundle: Path):
    from typer.testing import CliRunner

    from kubeml.cli import app
    from kubeml.config import load_config
    from kubeml.serving.rollout import LocalBackend
    from kubeml.testing.serving import register_bundle
    from tests.conftest import free_port, write_config

    write_config(project, {"serving": {"http_port": free_port(), "grpc_port": free_port()}})
    register_bundle(load_config("kubeml.yaml", "dev"), digits_bundle, model="digits")
    state = project / ".kubeml" / "serving"
    try:
        result = CliRunner().invoke(app, ["deploy", "digits", "--version", "1", "--bundle", str(digits_bundle), "--no-replay"])
        assert result.exit_code == 0, result.output
        args = _server_args(ServingManager(state).status()[0])
        assert not {"--batch-max-size", "--batch-max-latency-ms", "--request-timeout-s"} & set(args)
    finally:
        LocalBackend("digits", state_dir=state).stop()
