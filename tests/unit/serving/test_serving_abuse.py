"""Hostile traffic through the router and over gRPC, and overload at 10x capacity.

* 10,000 malformed REST payloads (the generator of ``test_serving_fuzz``) through the
  rollout router, and 10,000 malformed gRPC messages to the model server and to the
  router's gRPC front: 0 5xx, and no traceback or filesystem path in any answer.
* Overload: capacity measured first, then 10x that rate for 30 s: the server never
  crashes, answers only 200/429/503, and the p99 of the admitted requests stays bounded.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import requests

from kubeml._proc import free_port
from kubeml.serving import ServingManager
from tests.unit.serving.test_serving_fuzz import TOTAL, _tensor, _v2, generate

pytestmark = pytest.mark.slow

#: What an answer must never contain: a traceback, or a path on the serving machine.
LEAK = re.compile(r'Traceback|File "|site-packages|\.py\b|/(?:home|tmp|usr|var|work|opt|root|etc|srv)/')


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, digits_bundle: Path):
    from kubeml.serving.rollout.local import LocalBackend

    backend = LocalBackend("digits", state_dir=tmp_path_factory.mktemp("abuse"), router_grpc_port=0)
    try:
        backend.deploy_stable(digits_bundle, "1")
        yield backend
    finally:
        backend.stop()


def test_ten_thousand_malformed_payloads_through_the_router_get_no_5xx_and_leak_nothing(backend):
    router = backend.router()
    started = time.monotonic()
    statuses: Counter = Counter()
    bad: list[str] = []
    with requests.Session() as session:
        for i, (category, path, body) in enumerate(generate(random.Random(20261128))):
            r = session.post(router.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)
            statuses[r.status_code] += 1
            if r.status_code >= 500 or LEAK.search(r.text):
                bad.append(f"{category} {path} -> {r.status_code} {r.text[:160]!r}")
            if i % 1000 == 999:
                ok = session.post(f"{router.url}/v2/models/digits/infer", data=_v2([_tensor()]), timeout=60)
                assert ok.status_code == 200, ok.text
    elapsed = time.monotonic() - started
    assert sum(statuses.values()) == TOTAL
    assert not bad, f"{len(bad)} bad answers:\n" + "\n".join(bad[:20])
    assert set(statuses) <= set(range(400, 500)), statuses
    print(f"\nrouter REST fuzz: {TOTAL} payloads in {elapsed:.1f} s, statuses {dict(sorted(statuses.items()))}")


def _grpc_payloads(rng: random.Random, pb) -> list[bytes]:
    """TOTAL malformed ModelInfer requests, as bytes: random bytes, truncated messages,
    and well-formed messages that break the model's contract."""
    def request(**tensor) -> bytes:
        t = pb.ModelInferRequest.InferInputTensor(name=tensor.pop("name", "input"), datatype=tensor.pop("datatype", "FP32"),
                                                  shape=tensor.pop("shape", [1, 64]))
        t.contents.fp32_contents.extend(tensor.pop("data", [1.0] * 64))
        return pb.ModelInferRequest(model_name=tensor.pop("model", "digits"), inputs=[t]).SerializeToString()

    valid = request()
    makers = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))),
        lambda: valid[: rng.randrange(1, len(valid) - 1)],
        lambda: request(shape=[1, rng.choice([1, 63, 65])]),
        lambda: request(data=[1.0] * rng.randrange(0, 63)),
        lambda: request(datatype=rng.choice(["BYTES", "FP99", "", "INT8"])),
        lambda: request(shape=[rng.choice([10**9, 2**62]), 64]),
        lambda: request(shape=[-1, 64]),
        lambda: request(name=rng.choice(["x", ""])),
        lambda: request(model=f"m{rng.randrange(10**6)}"),
        lambda: request(data=[rng.choice([float("nan"), float("inf"), 1e30])] * 64),
        lambda: pb.ModelInferRequest(model_name="digits").SerializeToString(),
    ]
    return [makers[i % len(makers)]() for i in range(TOTAL)]


#: gRPC codes that stand for a server failure (HTTP 5xx); DEADLINE_EXCEEDED is not expected either.
SERVER_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}


@pytest.mark.parametrize("front", ["server", "router"])
def test_ten_thousand_malformed_grpc_messages_get_no_server_error_and_leak_nothing(backend, front):
    from kubeml.serving.rollout.grpc_front import oip_messages

    pb = oip_messages()
    router = backend.router()
    target = router.grpc_target if front == "router" else router.routes().stable_grpc
    payloads = _grpc_payloads(random.Random(7 if front == "router" else 8), pb)
    codes: Counter = Counter()
    bad: list[str] = []
    started = time.monotonic()

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            sem = asyncio.Semaphore(16)

            async def one(raw: bytes) -> None:
                async with sem:
                    try:
                        await call(raw, timeout=30)
                        codes[grpc.StatusCode.OK] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code()] += 1
                        if exc.code() in SERVER_CODES or LEAK.search(exc.details() or ""):
                            bad.append(f"{raw[:40]!r} -> {exc.code().name} {exc.details()[:160]!r}")

            await asyncio.gather(*(one(raw) for raw in payloads))
            answer = pb.ModelInferResponse.FromString(await call(_valid(pb), timeout=30))
            assert answer.model_name == "digits"

    asyncio.run(run())
    elapsed = time.monotonic() - started
    assert sum(codes.values()) == TOTAL
    assert not bad, f"{len(bad)} bad answers:\n" + "\n".join(bad[:20])
    print(f"\ngRPC fuzz via {front}: {TOTAL} messages in {elapsed:.1f} s, codes "
          f"{ {c.name: n for c, n in codes.most_common()} }")


def _valid(pb) -> bytes:
    t = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
    t.contents.fp32_contents.extend([1.0] * 64)
    return pb.ModelInferRequest(model_name="digits", inputs=[t]).SerializeToString()


# -- overload ------------------------------------------------------------------------------

OVERLOAD_S = 30.0
MAX_CONCURRENCY = 4
#: Injected service time per request: makes capacity a known quantity on a shared machine.
SERVICE_MS = 50.0


def test_overload_at_ten_times_capacity_for_30_s_is_refused_cleanly_with_a_bounded_p99(
        tmp_path_factory: pytest.TempPathFactory, digits_bundle: Path):
    import aiohttp

    from kubeml.serving.telemetry import FaultInjection

    manager = ServingManager(tmp_path_factory.mktemp("overload"))
    try:
        served = manager.deploy("digits", digits_bundle, version="1", max_concurrency=MAX_CONCURRENCY,
                                fault=FaultInjection(latency_ms=SERVICE_MS), http_port=free_port())
        body = _v2([_tensor()]).encode()
        headers = {"Content-Type": "application/json"}

        async def drive(rate: float, seconds: float, session: aiohttp.ClientSession) -> tuple[Counter, list[float]]:
            statuses: Counter = Counter()
            admitted: list[float] = []
            pending: set[asyncio.Task] = set()

            async def one() -> None:
                started = time.perf_counter()
                try:
                    async with session.post(served.v2_url, data=body, headers=headers) as r:
                        await r.read()
                        statuses[r.status] += 1
                        if r.status == 200:
                            admitted.append(time.perf_counter() - started)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

            end = time.monotonic() + seconds
            interval = 1.0 / rate
            next_at = time.monotonic()
            while time.monotonic() < end:
                task = asyncio.ensure_future(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*pending)
            return statuses, admitted

        async def run() -> dict:
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                # Single-request latency, then capacity: the rate the server completes at
                # with exactly MAX_CONCURRENCY requests in flight back to back.
                single = []
                for _ in range(10):
                    started = time.perf_counter()
                    async with session.post(served.v2_url, data=body, headers=headers) as r:
                        assert r.status == 200
                        await r.read()
                    single.append(time.perf_counter() - started)
                done = 0
                window_end = time.monotonic() + 5.0

                async def closed_loop() -> None:
                    nonlocal done
                    while time.monotonic() < window_end:
                        async with session.post(served.v2_url, data=body, headers=headers) as r:
                            await r.read()
                            done += r.status == 200

                await asyncio.gather(*(closed_loop() for _ in range(MAX_CONCURRENCY)))
                capacity = done / 5.0
                statuses, admitted = await drive(10 * capacity, OVERLOAD_S, session)
                return {"single": sorted(single), "capacity": capacity, "statuses": statuses, "admitted": sorted(admitted)}

        result = asyncio.run(run())
        statuses, admitted = result["statuses"], result["admitted"]
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] > 0 and statuses[503] + statuses[429] > statuses[200], statuses
        p99 = admitted[min(len(admitted) - 1, int(0.99 * len(admitted)))]
        single_p50 = result["single"][len(result["single"]) // 2]
        # An admitted request waits for no queue: at most the service time plus the
        # scheduling noise of a saturated 2-core box. Bound: 20x the idle single-request
        # latency, and far below the 30 s request timeout a queue would run into.
        bound = 20 * single_p50
        assert p99 <= bound, (p99, bound)
        live = manager.get("digits")
        assert live is not None and live.pid == served.pid and live.alive and live.ready  # no crash, no restart
        print(f"\noverload: single request p50 {single_p50 * 1000:.1f} ms, capacity {result['capacity']:.0f} req/s "
              f"at concurrency {MAX_CONCURRENCY}; {10 * result['capacity']:.0f} req/s for {OVERLOAD_S:g} s -> "
              f"{dict(statuses)}; admitted p99 {p99 * 1000:.1f} ms (bound {bound * 1000:.0f} ms)")
    finally:
        manager.stop()
