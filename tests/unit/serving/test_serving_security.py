"""A single-model server refuses the model repository API, and clients cannot grow its metrics.

Tried as an attacker would: anonymous unload over REST and gRPC, then random model names.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from kubeml._proc import free_port
from kubeml.serving import ServingManager
from kubeml.serving.manager import ServedModel


@pytest.fixture(scope="module")
def server(manager: ServingManager, digits_bundle: Path) -> ServedModel:
    return manager.deploy("digits", digits_bundle, version="1", grpc_port=free_port())


@pytest.fixture(scope="module")
def pb():
    from kubeml.serving._kserve import kserve  # noqa: F401  (imports kserve with a bare argv)
    from kserve.protocol.grpc import grpc_predict_v2_pb2

    return grpc_predict_v2_pb2


def _infer(server: ServedModel, rows: np.ndarray) -> requests.Response:
    body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}
    return requests.post(server.v2_url, json=body, timeout=30)


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/repository/models/digits/unload"),
    ("POST", "/v2/repository/models/digits/load"),
    ("POST", "/v2/repository/index"),
    ("GET", "/v2/repository/index"),
])
def test_repository_routes_are_refused_and_the_model_keeps_serving(server, digits_rows, method, path):
    r = requests.request(method, server.url + path, timeout=10)
    assert r.status_code == 403, r.text
    assert "disabled on a single-model server" in r.json()["error"]
    assert _infer(server, digits_rows).status_code == 200
    assert requests.get(f"{server.url}/v2/models/digits/ready", timeout=10).status_code == 200


def test_grpc_repository_unload_is_refused_and_infer_still_answers(server, pb, digits_rows):
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(f"{server.host}:{server.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="digits")),
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="digits")),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "disabled on a single-model server" in info.value.details()
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(digits_rows.shape))
        tensor.contents.fp32_contents.extend(digits_rows.ravel().tolist())
        reply = stub.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[tensor]), timeout=30)
        assert reply.model_name == "digits"
    assert _infer(server, digits_rows).status_code == 200


def _series(server: ServedModel) -> set[str]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {line.split(" ")[0] for line in text.splitlines() if line.startswith("kubeml_")}


def test_random_model_names_leave_the_metric_series_unchanged(server, digits_rows):
    # One unknown name first, asked the same way: it creates the fixed "_unknown" series, once.
    requests.post(f"{server.url}/v2/models/nope/infer", json={"inputs": []}, timeout=10)
    before = _series(server)
    with requests.Session() as session:
        for _ in range(1000):
            name = secrets.token_hex(6)
            r = session.post(f"{server.url}/v2/models/{name}/infer", json={"inputs": []}, timeout=10)
            assert r.status_code in (400, 404)
    after = _series(server)
    assert after == before, sorted(after - before)[:5]
    assert not any(re.search(r'model="[0-9a-f]{12}"', s) for s in after)
    assert any('model="_unknown"' in s for s in after)  # the requests were counted, under one label


# -- the rollout router --------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, digits_bundle: Path):
    from kubeml.serving.rollout.local import LocalBackend

    backend = LocalBackend("digits", state_dir=tmp_path_factory.mktemp("router-security"))
    try:
        backend.deploy_stable(digits_bundle, "1")
        yield backend
    finally:
        backend.stop()


def test_the_router_admin_api_needs_the_token_from_a_private_file(backend):
    import stat

    router = backend.router()
    token_file = Path(router.admin_token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    before = router.routes()
    hijack = {**before.to_dict(), "stable": "http://169.254.169.254"}  # never sent: refused first
    for method, path, kwargs in (
        ("PUT", "/-/rollout/routes", {"json": hijack}),
        ("GET", "/-/rollout/routes", {}),
        ("GET", "/-/rollout/stats", {}),
    ):
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            r = requests.request(method, router.url + path, headers=headers, timeout=10, **kwargs)
            assert r.status_code == 401, (method, path, r.text)
            assert "bearer token" in r.json()["error"]
    assert requests.get(f"{router.url}/-/rollout/healthz", timeout=10).status_code == 200  # probes stay open
    assert router.routes() == before  # the CLI's own client reads the token and gets through


def test_the_router_forwards_only_the_data_plane(backend, digits_rows):
    router = backend.router()
    for method, path in (
        ("POST", "/v2/repository/models/digits/unload"),
        ("POST", "/v2/repository/index"),
        ("GET", "/metrics"),
        ("GET", "/docs"),
        ("DELETE", "/v2/models/digits"),
    ):
        r = requests.request(method, router.url + path, timeout=10)
        assert r.status_code == 404 and "not routed" in r.json()["error"], (method, path, r.text)
    body = {"inputs": [{"name": "input", "shape": list(digits_rows.shape), "datatype": "FP32",
                        "data": digits_rows.ravel().tolist()}]}
    assert requests.post(f"{router.url}/v2/models/digits/infer", json=body, timeout=30).status_code == 200
    assert requests.get(f"{router.url}/v2/models/digits/ready", timeout=10).status_code == 200
    assert requests.get(f"{router.url}/v2/health/live", timeout=10).status_code == 200


def test_a_model_server_listens_on_loopback_only(server):
    import psutil

    process = psutil.Process(server.pid)
    connections = getattr(process, "net_connections", process.connections)  # psutil < 6 names it connections
    listening = [c.laddr for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert {a.port for a in listening} >= {server.http_port, server.grpc_port}
    import ipaddress

    # gRPC binds 127.0.0.1 as the IPv4-mapped ::ffff:127.0.0.1 on a dual-stack socket.
    addresses = {ipaddress.ip_address(a.ip) for a in listening}
    assert all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses), listening


def test_a_tiny_client_deadline_is_raised_to_the_floor_and_never_counted_as_a_server_error(
        manager: ServingManager, digits_bundle: Path, digits_rows):
    from kubeml.serving.telemetry import FaultInjection

    slow = manager.deploy("slow", digits_bundle, version="1", fault=FaultInjection(latency_ms=300))
    body = {"inputs": [{"name": "input", "shape": list(digits_rows.shape), "datatype": "FP32",
                        "data": digits_rows.ravel().tolist()}]}
    for _ in range(5):
        r = requests.post(slow.v2_url, json=body, headers={"x-request-timeout-ms": "0.001"}, timeout=30)
        assert r.status_code == 504 and "within 0.01 s (the x-request-timeout-ms header)" in r.json()["error"]
        assert r.headers.get("x-kubeml-deadline") == "client"
    text = requests.get(f"{slow.url}/metrics", timeout=10).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kubeml_")}
    # Counted as 504s, and apart as the client's own deadlines: the rollout analysis
    # (PrometheusMetrics.window) subtracts those from the errors it judges.
    assert samples['kubeml_requests_total{model="slow",protocol="v2",status="504",version="1"}'] == 5
    assert samples['kubeml_client_deadline_expired_total{model="slow",protocol="v2",version="1"}'] == 5
    # The server's own deadline still is a server error: a slow model is the server's problem.
    assert requests.post(slow.v2_url, json=body, timeout=30).status_code == 200


def test_overload_is_answered_503_with_retry_after_never_queued_without_bound(
        manager: ServingManager, digits_bundle: Path, digits_rows):
    from concurrent.futures import ThreadPoolExecutor

    from kubeml.serving.telemetry import FaultInjection

    busy = manager.deploy("busy", digits_bundle, version="1", fault=FaultInjection(latency_ms=800),
                          max_concurrency=2)
    body = {"inputs": [{"name": "input", "shape": list(digits_rows.shape), "datatype": "FP32",
                        "data": digits_rows.ravel().tolist()}]}

    def call(_: int) -> requests.Response:
        return requests.post(busy.v2_url, json=body, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        pending = [pool.submit(call, i) for i in range(12)]
        # While the server is saturated, probes still answer: overloaded is not dead.
        assert requests.get(f"{busy.url}/v2/health/live", timeout=5).status_code == 200
        answers = [f.result() for f in pending]
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert 2 <= statuses.count(200) < 12 and statuses.count(503) >= 1, statuses
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers.get("retry-after") == "1" and "overloaded" in refused.json()["error"]
    assert call(0).status_code == 200  # capacity is back once the burst is over
