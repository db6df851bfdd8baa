"""A real model server process (started through ServingManager) answering V1 and V2.

All tests share one server; the last test redeploys and stops it, so it stays last.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from kubeml.bundle import load_bundle
from kubeml.serving import ModelClient, ServedModel, ServingManager, ServingRequestError, smoke_test
from tests.conftest import free_port

VERSION = "7"


@pytest.fixture(scope="module")
def server(manager: ServingManager, digits_bundle: Path) -> ServedModel:
    # One server for the module: a cold start costs 10-20 s on a small CPU box.
    return manager.deploy("digits", digits_bundle, version=VERSION, grpc_port=free_port())


@pytest.fixture(scope="module")
def reference(digits_bundle: Path, digits_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and probabilities of the bundle's model run in this process."""
    model, _ = load_bundle(digits_bundle)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(digits_rows)), dim=1).numpy()
    return probs.argmax(axis=1), probs


def test_v1_predict_matches_in_process_model(server, digits_rows, reference):
    r = requests.post(server.v1_url, json={"instances": digits_rows.tolist()}, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["predictions"] == reference[0].tolist()
    np.testing.assert_allclose(body["probabilities"], reference[1], atol=1e-5)


def test_v2_infer_matches_in_process_model(server, digits_rows, reference):
    request = {
        "id": "req-1",
        "inputs": [
            {"name": "input", "shape": [5, 64], "datatype": "FP32", "data": digits_rows.ravel().tolist()}
        ],
    }
    r = requests.post(server.v2_url, json=request, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == "req-1"
    assert body["model_name"] == "digits"
    assert body["model_version"] == VERSION
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["predictions"]["datatype"] == "INT64"
    assert outputs["predictions"]["shape"] == [5]
    assert outputs["predictions"]["data"] == reference[0].tolist()
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["shape"] == [5, 10]
    np.testing.assert_allclose(
        np.reshape(outputs["probabilities"]["data"], (5, 10)), reference[1], atol=1e-5
    )


def test_v2_infer_returns_only_requested_outputs(server, digits_rows):
    request = {
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digits_rows[0].tolist()}],
        "outputs": [{"name": "predictions"}],
    }
    body = requests.post(server.v2_url, json=request, timeout=10).json()
    assert [o["name"] for o in body["outputs"]] == ["predictions"]


def test_metadata_reports_real_input_signature(server):
    meta = requests.get(f"{server.url}/v2/models/digits", timeout=10).json()
    assert meta["name"] == "digits"
    assert meta["versions"] == [VERSION]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [
        {"name": "predictions", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/digits/ready", {"name": "digits", "ready": True}),
        ("/v1/models/digits", {"name": "digits", "ready": True}),
        (f"/v2/models/digits/versions/{VERSION}/ready", {"name": "digits", "ready": True}),
    ],
)
def test_health_endpoints_report_ready(server, path, expected):
    r = requests.get(server.url + path, timeout=10)
    assert (r.status_code, r.json()) == (200, expected)


def test_versioned_infer_serves_only_the_deployed_version(server, digits_rows):
    request = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digits_rows[0].tolist()}]}
    ok = requests.post(f"{server.url}/v2/models/digits/versions/{VERSION}/infer", json=request, timeout=10)
    assert ok.status_code == 200 and ok.json()["model_version"] == VERSION
    other = requests.post(f"{server.url}/v2/models/digits/versions/999/infer", json=request, timeout=10)
    assert other.status_code == 404
    assert "serving '7'" in other.json()["error"]


ROW = [float(i % 17) for i in range(64)]
JSON = {"content-type": "application/json"}
OCTET = {"content-type": "application/octet-stream"}


def _v2(shape=(1, 64), data=ROW, datatype="FP32", name="input", **extra) -> str:
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}], **extra})


def _binary_v2(declared_bytes: int, actual: bytes) -> tuple[bytes, dict]:
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                     "parameters": {"binary_data_size": declared_bytes}}]}
    ).encode()
    return header + actual, {**OCTET, "inference-header-content-length": str(len(header))}


V1 = "/v1/models/digits:predict"
V2 = "/v2/models/digits/infer"
_TRUNCATED, _TRUNCATED_HEADERS = _binary_v2(256, b"\x00" * 10)
_MISALIGNED, _MISALIGNED_HEADERS = _binary_v2(7, b"\x00" * 7)

MALFORMED = {
    # (method, path, body, headers, expected status)
    "v1 broken json": ("POST", V1, '{"instances": [', JSON, 400),
    "v2 broken json": ("POST", V2, '{"inputs": [', JSON, 400),
    "v1 not json content": ("POST", V1, "hello", {"content-type": "text/plain"}, 400),
    "v2 not json content": ("POST", V2, "hello", {"content-type": "text/plain"}, 400),
    "v1 body is a list": ("POST", V1, "[1, 2]", JSON, 400),
    "v1 missing instances": ("POST", V1, "{}", JSON, 400),
    "v1 instances not a list": ("POST", V1, '{"instances": "x"}', JSON, 400),
    "v1 empty instances": ("POST", V1, '{"instances": []}', JSON, 400),
    "v1 ragged rows": ("POST", V1, json.dumps({"instances": [ROW, ROW[:3]]}), JSON, 400),
    "v1 wrong feature count": ("POST", V1, json.dumps({"instances": [ROW[:10]]}), JSON, 400),
    "v1 strings": ("POST", V1, json.dumps({"instances": [["a"] * 64]}), JSON, 400),
    "v1 objects": ("POST", V1, json.dumps({"instances": [[{}] * 64]}), JSON, 400),
    "v1 nulls": ("POST", V1, json.dumps({"instances": [[None] * 64]}), JSON, 400),
    "v1 NaN literal": ("POST", V1, '{"instances": [[NaN' + ",1" * 63 + "]]}", JSON, 400),
    "v1 infinite number": ("POST", V1, '{"instances": [[1e999' + ",1" * 63 + "]]}", JSON, 400),
    "v1 above range": ("POST", V1, json.dumps({"instances": [[99.0] * 64]}), JSON, 400),
    "v1 below range": ("POST", V1, json.dumps({"instances": [[-1.0] * 64]}), JSON, 400),
    "v1 batch too large": ("POST", V1, json.dumps({"instances": [ROW] * 1025}), JSON, 400),
    "v1 deep nesting": ("POST", V1, '{"instances": ' + "[" * 5000 + "]" * 5000 + "}", JSON, 400),
    "v1 moderate nesting": ("POST", V1, '{"instances": ' + "[" * 500 + "]" * 500 + "}", JSON, 400),
    "v2 deep nesting": ("POST", V2, '{"inputs": ' + "[" * 100000 + "]" * 100000 + "}", JSON, 400),
    "v2 wrong datatype": ("POST", V2, _v2(datatype="INT32"), JSON, 400),
    "v2 unknown datatype": ("POST", V2, _v2(datatype="FOO"), JSON, 400),
    "v2 fp16 as json": ("POST", V2, _v2(datatype="FP16"), JSON, 400),
    "v2 shape data mismatch": ("POST", V2, _v2(shape=(2, 64)), JSON, 400),
    "v2 negative shape": ("POST", V2, _v2(shape=(-1, 64)), JSON, 400),
    "v2 huge shape": ("POST", V2, _v2(shape=(10**12, 64)), JSON, 400),
    "v2 wrong rank": ("POST", V2, _v2(shape=(64,)), JSON, 400),
    "v2 shape not ints": ("POST", V2, _v2(shape=("a",)), JSON, 400),
    "v2 wrong input name": ("POST", V2, _v2(name="pixels"), JSON, 400),
    "v2 missing inputs": ("POST", V2, "{}", JSON, 400),
    "v2 empty inputs": ("POST", V2, '{"inputs": []}', JSON, 400),
    "v2 two inputs": ("POST", V2, json.dumps({"inputs": [json.loads(_v2())["inputs"][0]] * 2}), JSON, 400),
    "v2 missing data": ("POST", V2, json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}), JSON, 400),
    "v2 string data": ("POST", V2, _v2(data=["a"] * 64), JSON, 400),
    "v2 NaN": ("POST", V2, _v2().replace("0.0", "NaN", 1), JSON, 400),
    "v2 above range": ("POST", V2, _v2(data=[1e6] * 64), JSON, 400),
    "v2 unknown output": ("POST", V2, _v2(outputs=[{"name": "logits"}]), JSON, 400),
    "v2 binary without header": ("POST", V2, b"\x00\x01", OCTET, 400),
    "v2 binary header not a number": ("POST", V2, b"\x00\x01", {**OCTET, "inference-header-content-length": "abc"}, 400),
    "v2 binary truncated": ("POST", V2, _TRUNCATED, _TRUNCATED_HEADERS, 400),
    "v2 binary misaligned": ("POST", V2, _MISALIGNED, _MISALIGNED_HEADERS, 400),
    "v2 binary missing fields": ("POST", V2, b'{"inputs":[{}]}', {**OCTET, "inference-header-content-length": "15"}, 400),
    "v1 unknown model": ("POST", "/v1/models/nope:predict", json.dumps({"instances": [ROW]}), JSON, 404),
    "v2 unknown model": ("POST", "/v2/models/nope/infer", _v2(), JSON, 404),
    "v2 unknown model metadata": ("GET", "/v2/models/nope", None, {}, 404),
    "v2 unknown model ready": ("GET", "/v2/models/nope/ready", None, {}, 404),
    "v2 unknown version": ("POST", "/v2/models/digits/versions/0/infer", _v2(), JSON, 404),
    "unknown route": ("GET", "/v3/whatever", None, {}, 404),
    "wrong method": ("GET", V2, None, {}, 405),
    "explain": ("POST", "/v1/models/digits:explain", json.dumps({"instances": [ROW]}), JSON, 400),
    "oversized body": ("POST", V2, b"x" * (5 * 1024 * 1024), JSON, 413),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_4xx_json_and_server_keeps_serving(server, case):
    method, path, body, headers, status = MALFORMED[case]
    r = requests.request(method, server.url + path, data=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = requests.post(server.v1_url, json={"instances": [ROW]}, timeout=10)
    assert ok.status_code == 200


def test_oversized_chunked_body_gets_413(server):
    def chunks():
        for _ in range(100):
            yield b"x" * 65536

    r = requests.post(server.v2_url, data=chunks(), headers=JSON, timeout=30)
    assert r.status_code == 413
    assert "exceeds" in r.json()["error"]


def test_binary_tensor_extension_round_trips(server, digits_rows, reference):
    header = json.dumps(
        {
            "inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32",
                        "parameters": {"binary_data_size": digits_rows.nbytes}}],
            "outputs": [{"name": "predictions", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = requests.post(
        server.v2_url,
        data=header + digits_rows.tobytes(),
        headers={**OCTET, "inference-header-content-length": str(len(header))},
        timeout=10,
    )
    assert r.status_code == 200
    json_len = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:json_len])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 5 * 8
    predictions = struct.unpack("<5q", r.content[json_len:])
    assert list(predictions) == reference[0].tolist()


def test_tritonclient_http_infer_agrees(server, digits_rows, reference):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    try:
        assert client.is_server_live() and client.is_model_ready("digits")
        meta = client.get_model_metadata("digits")
        assert meta["inputs"][0]["shape"] == [-1, 64]
        for binary in (True, False):
            tensor = httpclient.InferInput("input", list(digits_rows.shape), "FP32")
            tensor.set_data_from_numpy(digits_rows, binary_data=binary)
            outputs = [
                httpclient.InferRequestedOutput("predictions", binary_data=binary),
                httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            ]
            result = client.infer("digits", [tensor], outputs=outputs, model_version=VERSION)
            np.testing.assert_array_equal(result.as_numpy("predictions"), reference[0])
            np.testing.assert_allclose(result.as_numpy("probabilities"), reference[1], atol=1e-5)
        bad = httpclient.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(digits_rows[:1, :63])
        with pytest.raises(Exception, match="shape"):
            client.infer("digits", [bad])
    finally:
        client.close()


def test_grpc_v2_infer_agrees_and_rejects_nan_as_invalid_argument(server, digits_rows, reference):
    # kserve's own generated OIP stubs: tritonclient.grpc registers the same proto file
    # name in protobuf's global pool and cannot be imported next to kserve.
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    def request(rows: np.ndarray) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(
            model_name="digits",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(rows.shape))],
            raw_input_contents=[rows.astype(np.float32).tobytes()],
        )

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=10).ready
        response = stub.ModelInfer(request(digits_rows), timeout=10)
        outputs = [o.name for o in response.outputs]
        predictions = np.frombuffer(response.raw_output_contents[outputs.index("predictions")], dtype=np.int64)
        np.testing.assert_array_equal(predictions, reference[0])
        nan = digits_rows[:1].copy()
        nan[0, 0] = np.nan
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(nan), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN" in err.value.details()


def test_client_and_smoke_test_agree_with_model(server, digits_rows, reference):
    with ModelClient.for_served(server) as client:
        assert client.live() and client.ready()
        assert client.v1_predict(digits_rows).predictions == tuple(reference[0])
        v2 = client.v2_infer(digits_rows)
        assert v2.predictions == tuple(reference[0])
        assert v2.model_version == VERSION
        with pytest.raises(ServingRequestError) as err:
            client.v1_predict(digits_rows[:, :10])
        assert err.value.status_code == 400
    report = smoke_test(server.url, "digits", digits_rows, expected=reference[0], min_accuracy=1.0)
    assert report.accuracy == 1.0
    assert report.model_version == VERSION
    assert report.instances == 5


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


# Must stay the last test of this module: it replaces and then stops the shared server.
def test_redeploy_replaces_server_on_same_port_and_stop_leaves_no_process(manager, server, digits_bundle):
    first = server
    try:
        assert first.ready and first.alive
        second = manager.deploy("digits", digits_bundle, version="2", http_port=first.http_port)
        assert second.pid != first.pid
        assert second.http_port == first.http_port
        assert _gone(first.pid)
        meta = requests.get(f"{second.url}/v2/models/digits", timeout=10).json()
        assert meta["versions"] == ["2"]

        [listed] = manager.status()
        assert (listed.name, listed.version, listed.pid) == ("digits", "2", second.pid)
        assert listed.alive and listed.ready
        assert listed.v1_url == f"http://127.0.0.1:{first.http_port}/v1/models/digits:predict"
        assert Path(listed.log_file).read_text()  # the server logs to the state dir
    finally:
        stopped = manager.stop()
    assert stopped == ["digits"]
    assert _gone(second.pid)
    with pytest.raises(ProcessLookupError):  # nothing left in the server's process group
        os.killpg(second.pid, 0)
    assert manager.status() == []
    assert json.loads(manager.state_file.read_text()) == {}
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", first.http_port))
