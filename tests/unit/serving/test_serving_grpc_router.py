"""Open Inference Protocol V2 over gRPC through the real router to real model servers.

One router with a gRPC front serves the module, with a stable server (gRPC on) behind it;
tests bring up canaries from real bundles (another seed: other weights, other answers).
Clients are standard OIP gRPC clients: kserve's ``InferenceGRPCClient`` and the generated
stub in this process, tritonclient.grpc in a child process (it registers the same protobuf
package as kserve and cannot share a process with it).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from kubeml._proc import free_port as _free_port
from kubeml.serving.rollout import DecisionLog, LocalBackend, RolloutEngine, RolloutPolicy, Routes
from kubeml.serving.rollout.local import instance_name

from tests.unit.serving.conftest import write_digits_bundle

pytestmark = pytest.mark.slow

MODEL = "digits"


@pytest.fixture(scope="module")
def pb():
    from kubeml.serving._kserve import kserve  # noqa: F401  (imports kserve with a bare argv)
    from kserve.protocol.grpc import grpc_predict_v2_pb2

    return grpc_predict_v2_pb2


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, digits_bundle: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(MODEL, state_dir=tmp_path_factory.mktemp("grpc-router"), router_grpc_port=0)
    try:
        backend.deploy_stable(digits_bundle, "1")
        yield backend
    finally:
        backend.stop()


@pytest.fixture(scope="module")
def router(backend: LocalBackend):
    router = backend.router()
    assert router is not None and router.grpc_port is not None
    return router


@pytest.fixture(scope="module")
def canary_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_bundle(tmp_path_factory.mktemp("canary") / "digits", seed=11)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 17, size=(64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def channel(router):
    import grpc

    with grpc.insecure_channel(router.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(pb, channel):
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    return GRPCInferenceServiceStub(channel)


def _request(pb, rows: np.ndarray, model: str = MODEL):
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(rows.shape))
    return pb.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[np.ascontiguousarray(rows, np.float32).tobytes()]
    )


def _predictions(response) -> list[int]:
    names = [o.name for o in response.outputs]
    index = names.index("predictions")
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[index], dtype=np.int64).tolist()
    return list(response.outputs[index].contents.int64_contents)


def _infer_with_backend(stub, pb, rows: np.ndarray) -> tuple[list[int], dict[str, str]]:
    response, call = stub.ModelInfer.with_call(_request(pb, rows), timeout=30)
    return _predictions(response), dict(call.initial_metadata())


def _rest_predictions(router, rows: np.ndarray) -> list[int]:
    body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    r = requests.post(f"{router.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return next(o["data"] for o in r.json()["outputs"] if o["name"] == "predictions")


def _start_canary(backend: LocalBackend, bundle: Path, version: str, *, weight: int, mirror: bool, fault=None):
    backend.prepare_canary(bundle, version, fault=fault)
    backend.start_canary()
    backend.set_traffic(weight=weight, mirror=mirror)


def _wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stable_grpc": "http://127.0.0.1:9000"}, "host:port"),
        ({"stable_grpc": "127.0.0.1"}, "host:port"),
        ({"stable_grpc": "127.0.0.1:70000"}, "host:port"),
        ({"canary_grpc": "127.0.0.1:9001"}, "canary URL"),
    ],
)
def test_routes_refuse_bad_grpc_targets(fields, message):
    with pytest.raises(ValueError, match=message):
        Routes(stable="http://127.0.0.1:8000", **fields)


def test_status_commands_show_the_grpc_address(backend, router, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from kubeml.cli import _common as cli
    from kubeml.cli.serve import app as serve_app
    from kubeml.cli.rollout import register

    monkeypatch.setattr(cli.console, "width", 250)  # the table, not the URLs, sets the width
    runner = CliRunner()
    served = runner.invoke(serve_app, ["status", "--state-dir", str(backend.state_dir)], terminal_width=250)
    assert served.exit_code == 0, served.output
    assert router.grpc_target in served.output
    stable = backend.manager.get(instance_name(MODEL, "1"))
    assert stable is not None and f"127.0.0.1:{stable.grpc_port}" in served.output
    rollout_app = typer.Typer()
    register(rollout_app)
    status = runner.invoke(rollout_app, ["rollout", "status", MODEL, "--state-dir", str(backend.state_dir)],
                           terminal_width=250)  # fmt: skip
    assert status.exit_code == 0, status.output
    assert f"gRPC {router.grpc_target}" in status.output


def test_standard_grpc_client_gets_the_same_predictions_as_rest_through_the_router(router, rows, pb, stub):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    expected = _rest_predictions(router, rows[:8])

    async def infer() -> list[int]:
        tensor = InferInput(name="input", shape=[8, 64], datatype="FP32")
        tensor.set_data_from_numpy(rows[:8], binary_data=True)
        async with InferenceGRPCClient(router.grpc_target, timeout=30) as client:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready(MODEL)
            result = await client.infer(InferRequest(model_name=MODEL, infer_inputs=[tensor]))
        return next(o for o in result.outputs if o.name == "predictions").as_numpy().tolist()

    import asyncio

    assert asyncio.run(infer()) == expected
    predictions, metadata = _infer_with_backend(stub, pb, rows[:8])
    assert predictions == expected
    assert metadata["x-kubeml-backend"] == "stable"
    assert metadata["x-kubeml-model-version"] == "1"
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
    assert meta.name == MODEL and [i.name for i in meta.inputs] == ["input"]


def test_tritonclient_grpc_interoperates_through_the_router(router, rows):
    script = """
import json, sys
import numpy as np
import tritonclient.grpc as g
target, model = sys.argv[1], sys.argv[2]
rows = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)
client = g.InferenceServerClient(target)
assert client.is_server_live() and client.is_model_ready(model)
tensor = g.InferInput("input", list(rows.shape), "FP32")
tensor.set_data_from_numpy(rows)
result = client.infer(model, [tensor], outputs=[g.InferRequestedOutput("predictions")], client_timeout=30)
print(json.dumps(result.as_numpy("predictions").tolist()))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, router.grpc_target, MODEL],
        input=json.dumps(rows[:8].tolist()), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == _rest_predictions(router, rows[:8])


def test_router_metadata_and_repository_calls(pb, stub):
    import grpc

    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "router" in err.value.details()


def test_malformed_grpc_input_is_invalid_argument_and_no_backend_error(router, pb, stub, channel, rows):
    import grpc

    before = router.stats()
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff\xff not a protobuf message", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelInferRequest" in err.value.details()

    bad_requests = {
        "wrong width": _request(pb, rows[:2, :63]),
        "NaN": _request(pb, np.full((1, 64), np.nan, np.float32)),
        "raw bytes not matching the shape": pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 64])],
            raw_input_contents=[rows[:1].tobytes()],
        ),
        "no inputs": pb.ModelInferRequest(model_name=MODEL),
    }
    for what, request in bad_requests.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.value.code(), err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_request(pb, rows[:1], model="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    after = router.stats()
    assert after["rejected"] == before["rejected"] + 1  # the bytes that are no message at all
    stable_before, stable_after = before["totals"]["stable"], after["totals"]["stable"]
    assert stable_after["errors"] == stable_before["errors"]  # client mistakes are not 5xx
    assert stable_after["requests"] == stable_before["requests"] + len(bad_requests) + 1
    window = router.stats(since=after["now"] - 60)["backends"]["stable"]
    assert window["client_errors"] >= len(bad_requests) + 1


def _grpc_load(target: str, pb, rows: np.ndarray, n: int, concurrency: int = 8) -> Counter:
    """``n`` ModelInfer calls from ``concurrency`` threads; counts answers by backend/status."""
    import grpc
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    seen: Counter = Counter()
    lock = threading.Lock()
    counter = iter(range(n))

    with grpc.insecure_channel(target) as channel:
        stub = GRPCInferenceServiceStub(channel)

        def work() -> None:
            for i in counter:
                try:
                    _, call = stub.ModelInfer.with_call(_request(pb, rows[i % len(rows)][None]), timeout=30)
                    key = dict(call.initial_metadata())["x-kubeml-backend"]
                except grpc.RpcError as exc:
                    key = exc.code().name
                with lock:
                    seen[key] += 1

        threads = [threading.Thread(target=work) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return seen


def test_weighted_split_sends_about_a_fifth_of_grpc_traffic_to_the_canary(backend, router, canary_bundle, pb, rows):
    _start_canary(backend, canary_bundle, "2", weight=20, mirror=False)
    try:
        before = router.stats()
        seen = _grpc_load(router.grpc_target, pb, rows, 500)
        after = router.stats()
    finally:
        backend.rollback()
    assert seen["stable"] + seen["canary"] == 500, seen
    # Binomial(500, 0.2): mean 100, sd 8.9; 4.5 sd either side fails by chance ~1e-5.
    sd = math.sqrt(500 * 0.2 * 0.8)
    assert abs(seen["canary"] - 100) <= 4.5 * sd, seen
    delta = {b: after["totals"][b]["requests"] - before["totals"][b]["requests"] for b in ("stable", "canary")}
    assert delta["canary"] == seen["canary"]  # the engine's numbers are the clients' numbers
    assert delta["stable"] == seen["stable"]
    assert after["totals"]["canary"]["errors"] == before["totals"]["canary"]["errors"]
    # Each canary answer was also sent to stable and compared: other weights, some differ.
    window = router.stats(since=before["now"])["divergence"]
    assert window["compared"] > 0 and 0 < window["differing"] <= window["compared"], window


def test_shadow_mode_answers_from_stable_and_mirrors_to_the_canary(backend, router, canary_bundle, pb, rows):
    _start_canary(backend, canary_bundle, "3", weight=0, mirror=True)
    try:
        before = router.stats()
        seen = _grpc_load(router.grpc_target, pb, rows, 120, concurrency=4)
        # Shadow copies run in the background; wait until the canary has seen them.
        _wait_for(
            lambda: router.stats()["totals"]["canary"]["requests"] - before["totals"]["canary"]["requests"]
            + router.stats()["skipped_background"] - before["skipped_background"] >= 120,
            what="shadow copies",
        )
        after = router.stats()
    finally:
        backend.rollback()
    assert seen == Counter(stable=120)  # users only ever get stable's answers
    mirrored = after["totals"]["canary"]["requests"] - before["totals"]["canary"]["requests"]
    assert mirrored > 0 and mirrored + after["skipped_background"] - before["skipped_background"] == 120
    assert after["totals"]["stable"]["requests"] - before["totals"]["stable"]["requests"] == 120
    window = router.stats(since=before["now"])["divergence"]
    assert window["compared"] == mirrored and window["differing"] > 0


def test_canary_that_is_down_counts_as_errors_and_stable_answers_instead(backend, router, canary_bundle, pb, rows):
    _start_canary(backend, canary_bundle, "4", weight=50, mirror=False)
    try:
        served = backend.manager.get(instance_name(MODEL, "4"))
        assert served is not None
        backend.manager.stop(instance_name(MODEL, "4"))  # the canary crashes
        before = router.stats()
        seen = _grpc_load(router.grpc_target, pb, rows, 60, concurrency=4)
        after = router.stats()
    finally:
        backend.rollback()
    assert seen == Counter(stable=60)  # fallback: every user got stable's answer
    canary_errors = after["totals"]["canary"]["errors"] - before["totals"]["canary"]["errors"]
    assert canary_errors > 0
    assert after["fallbacks"] - before["fallbacks"] == canary_errors
    window = router.stats(since=before["now"])["backends"]["canary"]
    assert window["error_rate"] == 1.0


def test_canary_with_half_injected_faults_shows_grpc_errors_in_router_stats(backend, router, pb, rows, digits_bundle):
    from kubeml.serving.telemetry import FaultInjection

    _start_canary(backend, digits_bundle, "6", weight=50, mirror=False, fault=FaultInjection(error_rate=0.5))
    try:
        canary_url = router.routes().canary
        before = router.stats()
        seen = _grpc_load(router.grpc_target, pb, rows, 200, concurrency=4)
        after = router.stats()
        metrics = requests.get(f"{canary_url}/metrics", timeout=10).text
    finally:
        backend.rollback()
    assert seen == Counter(stable=seen["stable"], canary=seen["canary"])  # no user saw an error
    canary = {k: after["totals"]["canary"][k] - before["totals"]["canary"][k] for k in ("requests", "errors")}
    # ~100 canary calls, half of them failing: the engine sees an error rate near 0.5.
    assert canary["requests"] > 50 and 0.3 < canary["errors"] / canary["requests"] < 0.7, canary
    assert after["fallbacks"] - before["fallbacks"] == canary["errors"]
    # The canary server counts its gRPC calls like HTTP ones: protocol grpc, the failures
    # as 503 (UNAVAILABLE), every other one answered 200, each timed.
    failed = _metric(metrics, "kubeml_requests_total", protocol="grpc", status="503", version="6")
    served = _metric(metrics, "kubeml_requests_total", protocol="grpc", status="200", version="6")
    timed = _metric(metrics, "kubeml_request_latency_seconds_count", protocol="grpc", version="6")
    assert failed == canary["errors"] and served == canary["requests"] - canary["errors"], (failed, served, canary)
    assert abs(failed - served) <= 1 and timed == failed + served
    assert _metric(metrics, "kubeml_requests_total", protocol="v2", version="6") == 0  # no HTTP traffic


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        sample_labels, value = line[len(name) + 1 :].rsplit("} ", 1)
        found = dict(part.split("=", 1) for part in sample_labels.split(","))
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


def test_stable_that_is_down_answers_unavailable_naming_the_backend(router, pb, stub, rows):
    import grpc

    routes = router.routes()
    dead = _free_port("127.0.0.1")
    router.set_routes(Routes(stable=routes.stable, stable_version="1", stable_grpc=f"127.0.0.1:{dead}"))
    try:
        before = router.stats()["totals"]["stable"]
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request(pb, rows[:1]), timeout=10)
        after = router.stats()["totals"]["stable"]
    finally:
        router.set_routes(routes)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details()
    assert "stable backend (version 1)" in details and f"127.0.0.1:{dead}" in details and "unavailable" in details
    assert dict(err.value.initial_metadata())["x-kubeml-backend"] == "stable"
    assert after["errors"] == before["errors"] + 1
    # Back on the live stable, the same call succeeds again.
    assert _infer_with_backend(stub, pb, rows[:1])[1]["x-kubeml-backend"] == "stable"


def test_spent_deadline_is_answered_at_once(router, pb, stub, rows, echo_backend):
    """A deadline spent while the backend works is answered then, not when the backend ends.

    Deterministic: the backend takes 10 s for model "slow" and the client allows 0.2 s. (A
    1 ms deadline against a fast backend races the client's own deadline timer against the
    answer, and a loaded machine can let the answer win.)
    """
    import grpc

    routes = router.routes()
    router.set_routes(Routes(stable=routes.stable, stable_version="1", stable_grpc=echo_backend))
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request(pb, rows[:1], model="slow"), timeout=0.2)
    finally:
        router.set_routes(routes)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


@pytest.fixture()
def echo_backend(pb) -> Iterator[str]:
    """A plain gRPC server that answers ModelInfer with what it received: the request id
    metadata, the deadline left, and its own initial and trailing metadata."""
    from concurrent import futures

    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):
            metadata = dict(context.invocation_metadata())
            if request.model_name == "busy":
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "echo: too busy, retry later")
            if request.model_name == "slow":
                time.sleep(10.0)  # far past any deadline a test gives
            context.send_initial_metadata((("x-echo-initial", "yes"),))
            context.set_trailing_metadata((("x-echo-trailing", "yes"),))
            remaining = context.time_remaining()
            return pb.ModelInferResponse(
                model_name=request.model_name,
                id=metadata.get("x-request-id", ""),
                model_version="none" if remaining is None else f"{remaining:.3f}",
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_client_metadata_deadline_and_backend_status_pass_through(router, pb, stub, rows, echo_backend):
    import grpc

    routes = router.routes()
    router.set_routes(Routes(stable=routes.stable, stable_version="1", stable_grpc=echo_backend))
    try:
        response, call = stub.ModelInfer.with_call(
            _request(pb, rows[:1]), metadata=(("x-request-id", "grpc-abc-1"),), timeout=7
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request(pb, rows[:1], model="busy"), timeout=7)
    finally:
        router.set_routes(routes)
    assert response.id == "grpc-abc-1"  # client metadata reached the backend
    assert 3.0 < float(response.model_version) < 8.0  # the client's deadline, not the 30 s default
    initial, trailing = dict(call.initial_metadata()), dict(call.trailing_metadata())
    assert initial["x-echo-initial"] == "yes" and initial["x-kubeml-backend"] == "stable"
    assert trailing["x-echo-trailing"] == "yes"
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the backend's own status
    assert err.value.details() == "echo: too busy, retry later"


def test_grpc_only_traffic_rolls_back_a_divergent_canary(backend, router, canary_bundle, pb, rows):
    policy = RolloutPolicy(
        steps=(10, 100), interval_s=2.0, shadow_analyses=1, failure_limit=1, min_requests=5,
        min_compared=5, max_divergence=0.05, max_p99_ms=None,
    )  # fmt: skip
    stop = threading.Event()
    seen: Counter = Counter()

    def traffic() -> None:
        while not stop.is_set():
            seen.update(_grpc_load(router.grpc_target, pb, rows, 16, concurrency=2))

    rest_before = router.stats()["totals"]
    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        backend.prepare_canary(canary_bundle, "5")
        result = RolloutEngine(
            backend, policy, DecisionLog(backend.decisions_file),
            control_file=backend.control_file, state_file=backend.state_file,
        ).run()  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert result.outcome == "rolled_back"
    assert "divergence" in result.reason
    assert result.max_weight == 0
    assert seen["canary"] == 0 and seen["stable"] > 0  # shadow: users got stable only
    routes = router.routes()
    assert routes.canary is None and routes.stable_version == "1" and routes.stable_grpc is not None
    assert backend.manager.get(instance_name(MODEL, "5")) is None
    after = router.stats()["totals"]
    assert after["stable"]["requests"] - rest_before["stable"]["requests"] == seen["stable"]
