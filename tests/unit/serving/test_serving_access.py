"""Who may call a model server, and how long a client may hold it.

Bearer tokens on inference (REST, gRPC, through the router's REST and gRPC fronts, a
rotated token file), mTLS on both sockets, liveness tied to the model, header and idle
timeouts against slow clients.
"""

from __future__ import annotations

import asyncio
import datetime
import resource
import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from kubeml._proc import free_port
from kubeml.serving import ServingManager
from kubeml.serving.manager import ServedModel
from kubeml.serving.tokens import first_token, write_token_file

#: Header timeout of the servers in this module: short, so the tests wait little for it.
HEADER_TIMEOUT_S = 2.0


def _body(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_file(tmp_path_factory.mktemp("secret") / "tokens")


@pytest.fixture(scope="module")
def server(manager: ServingManager, digits_bundle: Path, token_file: Path) -> ServedModel:
    return manager.deploy("digits", digits_bundle, version="1", grpc_port=free_port(),
                          auth_token_file=token_file, header_timeout_s=HEADER_TIMEOUT_S)


def _pb():
    from kubeml.serving._kserve import kserve  # noqa: F401  (imports kserve with a bare argv)
    from kserve.protocol.grpc import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

    return grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc


def _grpc_infer(channel: grpc.Channel, rows: np.ndarray, metadata=()) -> object:
    pb, pb_grpc = _pb()
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        pb.ModelInferRequest(model_name="digits", inputs=[tensor]), metadata=metadata, timeout=30)


def test_inference_needs_a_token_from_the_file_and_probes_stay_open(server, token_file, digits_rows):
    token = first_token(token_file)
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"}, {"Authorization": token}):
        r = requests.post(server.v2_url, json=_body(digits_rows), headers=headers, timeout=30)
        assert r.status_code == 401 and "inference token" in r.json()["error"], (headers, r.text)
        assert requests.get(f"{server.url}/v2/models/digits", headers=headers, timeout=10).status_code == 401
    good = {"Authorization": f"Bearer {token}"}
    assert requests.post(server.v2_url, json=_body(digits_rows), headers=good, timeout=30).status_code == 200
    assert requests.post(server.v1_url, json={"instances": digits_rows.tolist()}, headers=good,
                         timeout=30).status_code == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready", "/metrics"):
        assert requests.get(server.url + path, timeout=10).status_code == 200, path
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'model="digits",protocol="v2",status="401"' in text  # refusals are counted


def test_grpc_inference_needs_the_token_in_metadata(server, token_file, digits_rows):
    token = first_token(token_file)
    with grpc.insecure_channel(f"{server.host}:{server.grpc_port}") as channel:
        for metadata in ((), (("authorization", "Bearer not-the-right-one-either"),)):
            with pytest.raises(grpc.RpcError) as info:
                _grpc_infer(channel, digits_rows, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
        assert _grpc_infer(channel, digits_rows, (("authorization", f"Bearer {token}"),)).model_name == "digits"
        pb, pb_grpc = _pb()
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_a_rotated_token_file_takes_effect_without_a_restart(server, token_file, digits_rows):
    old = first_token(token_file)
    new = "rotated-" + "x" * 40
    token_file.write_text(f"# rotation: both valid for a while\n{old}\n{new}\n")
    time.sleep(1.5)  # the file is checked at most once a second
    for token in (old, new):
        r = requests.post(server.v2_url, json=_body(digits_rows), headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, r.text
    token_file.write_text(f"{new}\n")
    time.sleep(1.5)
    assert requests.post(server.v2_url, json=_body(digits_rows), headers={"Authorization": f"Bearer {old}"},
                         timeout=30).status_code == 401
    token_file.write_text(f"{old}\n")
    time.sleep(1.5)
    assert requests.post(server.v2_url, json=_body(digits_rows), headers={"Authorization": f"Bearer {old}"},
                         timeout=30).status_code == 200


def test_the_router_passes_the_clients_credentials_to_the_servers(tmp_path_factory, digits_bundle, token_file,
                                                                 digits_rows):
    from kubeml.serving.rollout.local import LocalBackend

    backend = LocalBackend("digits", state_dir=tmp_path_factory.mktemp("router-auth"), router_grpc_port=0,
                           auth_token_file=token_file)
    try:
        router = backend.deploy_stable(digits_bundle, "1")
        token = first_token(token_file)
        url = f"{router.url}/v2/models/digits/infer"
        assert requests.post(url, json=_body(digits_rows), timeout=30).status_code == 401
        r = requests.post(url, json=_body(digits_rows), headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200 and r.headers["x-kubeml-backend"] == "stable"
        with grpc.insecure_channel(router.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                _grpc_infer(channel, digits_rows)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _grpc_infer(channel, digits_rows, (("authorization", f"Bearer {token}"),)).model_name == "digits"
        # Admin and data plane stay apart: the inference token opens no admin route.
        assert requests.get(f"{router.url}/-/rollout/routes", headers={"Authorization": f"Bearer {token}"},
                            timeout=10).status_code == 401
    finally:
        backend.stop()


# -- mTLS ----------------------------------------------------------------------------------


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it,
    plus a client certificate from a CA the server does not trust."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        out[f"{name}.key"] = directory / f"{name}.key"
        out[f"{name}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        out[f"{name}.crt"] = directory / f"{name}.crt"
        out[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, issuer_key, issuer_name, *, ca: bool = False, server: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                            critical=False)
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        write(name, key, cert)
        return key, cert

    ca_key, ca_cert = issue("ca", None, None, ca=True)
    issue("server", ca_key, ca_cert.subject, server=True)
    issue("client", ca_key, ca_cert.subject)
    rogue_key, rogue_cert = issue("rogue-ca", None, None, ca=True)
    issue("rogue", rogue_key, rogue_cert.subject)
    return out


def test_mtls_refuses_clients_without_a_certificate_from_the_ca(tmp_path, digits_bundle, digits_rows):
    import subprocess
    import sys

    pki = _certificates(tmp_path)
    port, grpc_port = free_port(), free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeml.serving.server", "--model-dir", str(digits_bundle), "--model-name", "digits",
         "--http-port", str(port), "--grpc-port", str(grpc_port), "--tls-cert-file", str(pki["server.crt"]),
         "--tls-key-file", str(pki["server.key"]), "--tls-client-ca-file", str(pki["ca.crt"])],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    client = (str(pki["client.crt"]), str(pki["client.key"]))
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if requests.get(f"{url}/v2/models/digits/ready", cert=client, verify=str(pki["ca.crt"]), timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mTLS server not ready in 180 s"
            time.sleep(0.25)
        r = requests.post(f"{url}/v2/models/digits/infer", json=_body(digits_rows), cert=client,
                          verify=str(pki["ca.crt"]), timeout=30)
        assert r.status_code == 200, r.text
        for cert in (None, (str(pki["rogue.crt"]), str(pki["rogue.key"]))):
            # Refused in the handshake: under TLS 1.3 the client may see the alert as an
            # SSLError or as the connection closed before any HTTP answer (both ConnectionError).
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.post(f"{url}/v2/models/digits/infer", json=_body(digits_rows), cert=cert,
                              verify=str(pki["ca.crt"]), timeout=30)
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP gets no answer either
            requests.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=_body(digits_rows), timeout=30)

        ca = pki["ca.crt"].read_bytes()
        good = grpc.ssl_channel_credentials(ca, pki["client.key"].read_bytes(), pki["client.crt"].read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", good) as channel:
            assert _grpc_infer(channel, digits_rows).model_name == "digits"
        for creds in (grpc.ssl_channel_credentials(ca),
                      grpc.ssl_channel_credentials(ca, pki["rogue.key"].read_bytes(), pki["rogue.crt"].read_bytes())):
            with grpc.secure_channel(f"127.0.0.1:{grpc_port}", creds) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    _grpc_infer(channel, digits_rows)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


# -- liveness ------------------------------------------------------------------------------


def _asgi_get(app, path: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_liveness_is_live_while_loading_and_serving_and_not_after_a_failed_or_lost_model():
    pytest.importorskip("kserve")
    from kubeml.serving.server._app import Liveness, _LivenessProbe

    class Model:
        ready = False

    async def kserve_live(scope, receive, send) -> None:  # what kserve answers when asked
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"live": true}'})

    model = Model()
    liveness = Liveness(model)
    probe = _LivenessProbe(kserve_live, liveness=liveness)
    assert _asgi_get(probe, "/v2/health/live")[0] == 200  # loading: live, not ready
    model.ready = True
    liveness.loaded()
    assert _asgi_get(probe, "/v2/health/live")[0] == 200
    model.ready = False  # lost after loading
    status, body = _asgi_get(probe, "/v2/health/live")
    assert status == 503 and b"no longer ready" in body
    failed = Liveness(Model())
    failed.failed("SafetensorError")
    status, body = _asgi_get(_LivenessProbe(kserve_live, liveness=failed), "/v2/health/live")
    assert status == 503 and b"failed to load: SafetensorError" in body
    assert _asgi_get(_LivenessProbe(kserve_live, liveness=Liveness(None)), "/v2/health/live")[0] == 200


def test_a_served_model_is_live_and_the_inference_service_probes_liveness(server):
    from kubeml.serving.inferenceservice import PredictorConfig, predictor_spec

    assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    container = predictor_spec(PredictorConfig(image="i", storage_uri="s3://b/m/1", model_name="digits",
                                               version="1", auth_secret="digits-tokens"))["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/digits/ready"
    assert container["args"][-2:] == ["--auth-token-file", "/var/run/kubeml/auth/tokens"]


def test_the_token_secret_is_mounted_beside_the_read_only_roots_scratch():
    from kubeml.serving.inferenceservice import PredictorConfig, predictor_spec

    spec = predictor_spec(PredictorConfig(image="i", storage_uri="s3://b/m/1", model_name="digits",
                                          version="1", auth_secret="digits-tokens"))
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts.keys() == volumes.keys() == {"tmp", "kubeml-auth"}
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert mounts["kubeml-auth"] == {"name": "kubeml-auth", "mountPath": "/var/run/kubeml/auth", "readOnly": True}
    assert volumes["kubeml-auth"] == {"name": "kubeml-auth", "secret": {"secretName": "digits-tokens"}}


# -- slow clients --------------------------------------------------------------------------

IDLE_CONNECTIONS = 500


def test_500_idle_connections_leave_the_server_answering_and_are_closed_after_the_header_timeout(
        server, token_file, digits_rows):
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= IDLE_CONNECTIONS + 100, f"fd limit {soft} too low for {IDLE_CONNECTIONS} connections"
    import psutil

    limit = psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
    good = {"Authorization": f"Bearer {first_token(token_file)}"}
    idle = []
    try:
        opened = time.monotonic()
        for i in range(IDLE_CONNECTIONS):
            s = socket.create_connection((server.host, server.http_port), timeout=10)
            if i % 2:
                s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            idle.append(s)
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            r = requests.post(server.v2_url, json=_body(digits_rows), headers=good, timeout=10)
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
        assert time.monotonic() - opened < HEADER_TIMEOUT_S + 30
        # Past the header timeout every one of them is closed by the server.
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 10
        closed = 0
        for s in idle:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += s.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                closed += 0
        assert closed == IDLE_CONNECTIONS, f"{closed} of {IDLE_CONNECTIONS} slow connections closed"
    finally:
        for s in idle:
            s.close()
    print(f"\n{IDLE_CONNECTIONS} idle connections (server fd limit {limit}): infer p50 "
          f"{sorted(latencies)[10] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; all closed within "
          f"{HEADER_TIMEOUT_S:g} s header timeout")


def _dribble(host: str, port: int) -> tuple[bool, float, int]:
    """Send a request's headers at 10 bytes a second: ``(cut off, seconds, bytes sent)``."""
    import select

    s = socket.create_connection((host, port), timeout=10)
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1000
    started = time.monotonic()
    sent, cut = 0, False
    try:
        for byte in request:  # 10 bytes a second: 100 s for the whole request
            if select.select([s], [], [], 0.1)[0] and s.recv(1) == b"":
                cut = True
                break
            s.sendall(bytes([byte]))
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        cut = True
    elapsed = time.monotonic() - started
    s.close()
    return cut, elapsed, sent


def test_a_client_dribbling_its_headers_is_cut_off_within_the_header_timeout(server):
    cut, elapsed, sent = _dribble(server.host, server.http_port)
    assert cut, f"the server kept a client that sent {sent} header bytes over {elapsed:.1f} s"
    assert HEADER_TIMEOUT_S - 0.2 <= elapsed <= HEADER_TIMEOUT_S + 2, elapsed
    print(f"\nheader dribbler ({sent} bytes at 10 B/s) disconnected after {elapsed:.2f} s "
          f"(header timeout {HEADER_TIMEOUT_S:g} s)")


def test_the_router_cuts_off_a_dribbling_client_and_keeps_answering(tmp_path):
    import subprocess
    import sys

    from kubeml._proc import terminate_group

    port = free_port()
    token = write_token_file(tmp_path / "admin-token")
    router = subprocess.Popen(
        [sys.executable, "-m", "kubeml.serving.rollout.router", "--port", str(port), "--routes-file",
         str(tmp_path / "routes.json"), "--admin-token-file", str(token), "--header-timeout-s", str(HEADER_TIMEOUT_S)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    healthz = f"http://127.0.0.1:{port}/-/rollout/healthz"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(healthz, timeout=2)  # answers (503: no routes yet, not ready)
                break
            except requests.RequestException:
                pass
            assert router.poll() is None and time.monotonic() < deadline, "router did not start"
            time.sleep(0.2)
        cut, elapsed, sent = _dribble("127.0.0.1", port)
        assert cut, f"the router kept a client that sent {sent} header bytes over {elapsed:.1f} s"
        assert HEADER_TIMEOUT_S - 0.2 <= elapsed <= HEADER_TIMEOUT_S + 2, elapsed
        assert requests.get(healthz, timeout=5).json()["ready"] is False  # answering throughout
        print(f"\nrouter: header dribbler ({sent} bytes at 10 B/s) disconnected after {elapsed:.2f} s "
              f"(header timeout {HEADER_TIMEOUT_S:g} s)")
    finally:
        terminate_group(router.pid)
        router.wait(10)
