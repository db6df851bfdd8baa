"""Serving benchmark: bare KServe ModelServer vs kubeml with a canary split, one run.

Same bundle (digits CNN, 64 features), same machine, same load generator (asyncio,
closed loop, fixed concurrency, 1-row Open Inference Protocol V2 requests):

    (a) bare     a minimal kserve.Model in a bare ModelServer         (bare_server.py)
    (b) kubeml   router -> stable 90% / canary 10% kubeml servers, with validation,
                 telemetry, payload logging off, divergence comparison on

gRPC: (a) bare gRPC vs (b) the same canary split through the router's gRPC front
(Open Inference Protocol V2, ModelInfer), plus a kubeml server's gRPC directly.
Also in-process ONNX Runtime vs PyTorch eager latency for the same model, batch 1.

    .venv/bin/python benchmarks/serving/bench_serving.py [--seconds 15] [--concurrency 8]

Prints a table and ratios, and appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from kubeml._proc import free_port

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _bundle(directory: Path) -> Path:
    import torch

    from kubeml.bundle import BundleSpec, save_bundle
    from kubeml.models import build_model

    torch.manual_seed(0)
    spec = BundleSpec(arch="digits_cnn", input_shape=(64,), classes=tuple(str(i) for i in range(10)),
                      input_min=0.0, input_max=16.0)  # fmt: skip
    save_bundle(directory, build_model("digits_cnn"), spec)
    return directory


def _body(rows: np.ndarray, i: int) -> bytes:
    row = rows[i % len(rows)]
    return json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
    ).encode()


async def _rest_load(url: str, rows: np.ndarray, seconds: float, concurrency: int) -> dict:
    import aiohttp

    bodies = [_body(rows, i) for i in range(len(rows))]
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            async with session.post(url, data=bodies[i % len(bodies)],
                                    headers={"content-type": "application/json"}) as r:  # fmt: skip
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return _summary(latencies, errors, elapsed)


async def _grpc_load(target: str, rows: np.ndarray, seconds: float, concurrency: int) -> dict:
    import grpc

    sys.argv = sys.argv[:1]
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    requests = []
    for row in rows:
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
        tensor.contents.fp32_contents.extend(row.tolist())
        requests.append(pb.ModelInferRequest(model_name="digits", inputs=[tensor]))
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await stub.ModelInfer(requests[i % len(requests)])
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return _summary(latencies, errors, elapsed)


def _summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def _wait_ready(url: str, timeout_s: float = 240) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


def _onnx_vs_eager(bundle: Path, rows: np.ndarray, iterations: int = 2000) -> dict:
    import onnxruntime as ort
    import torch

    from kubeml.bundle import load_bundle

    module, _ = load_bundle(bundle)
    x = torch.from_numpy(rows[:1])
    path = bundle.parent / "digits.onnx"
    torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}}, dynamo=False)  # fmt: skip
    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": rows[:1]}
    out = {}
    for name, fn in (
        ("pytorch_eager", lambda: module(x)),
        ("onnxruntime", lambda: session.run(None, feed)),
    ):
        with torch.inference_mode():
            for _ in range(100):
                fn()
            times = []
            for _ in range(iterations):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        ms = np.asarray(times) * 1000
        out[name] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    with torch.inference_mode():
        np.testing.assert_allclose(module(x).numpy(), session.run(None, feed)[0], atol=1e-4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()

    from kubeml.serving.rollout import LocalBackend
    from kubeml.serving.rollout.router import Routes

    work = Path(tempfile.mkdtemp(prefix="kubeml-bench-"))
    bundle = _bundle(work / "digits")
    rows = np.random.default_rng(0).integers(0, 17, size=(256, 64)).astype(np.float32)
    env = {**os.environ, "JE_ARROW_MALLOC_CONF": "background_thread:false"}

    bare_http, bare_grpc = free_port(), free_port()
    bare = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bare_server.py")), str(bundle),
         str(bare_http), str(bare_grpc)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    backend = LocalBackend("digits", state_dir=work / "state", router_grpc_port=0)
    results: dict[str, dict] = {}
    try:
        router = backend.deploy_stable(bundle, "1")
        canary = backend._deploy_version(bundle, "2")  # with a gRPC port: the router serves gRPC
        routes = router.routes()
        router.set_routes(Routes(stable=routes.stable, stable_version="1", stable_grpc=routes.stable_grpc,
                                 canary=canary.url, canary_version="2",
                                 canary_grpc=f"{canary.host}:{canary.grpc_port}", weight=10))  # fmt: skip
        assert router.grpc_target is not None
        _wait_ready(f"http://127.0.0.1:{bare_http}/v2/models/digits/ready")
        stable = backend.manager.get("digits-v1")
        grpc_port = free_port()
        # A kubeml server with gRPC enabled, for the gRPC comparison (direct, no router).
        direct = backend.manager.deploy("digits", bundle, version="1", instance="digits-grpc",
                                        grpc_port=grpc_port)  # fmt: skip
        assert stable is not None
        load = (args.seconds, args.concurrency)
        # Warm-up, then the measured runs, alternating peers so drift on a shared machine
        # hits both sides alike.
        for url in (f"http://127.0.0.1:{bare_http}", router.url):
            asyncio.run(_rest_load(f"{url}/v2/models/digits/infer", rows, 2.0, args.concurrency))
        for target in (f"127.0.0.1:{bare_grpc}", router.grpc_target):
            asyncio.run(_grpc_load(target, rows, 2.0, args.concurrency))
        results["bare_rest"] = asyncio.run(
            _rest_load(f"http://127.0.0.1:{bare_http}/v2/models/digits/infer", rows, *load))
        results["kubeml_canary_rest"] = asyncio.run(
            _rest_load(f"{router.url}/v2/models/digits/infer", rows, *load))
        results["kubeml_direct_rest"] = asyncio.run(
            _rest_load(f"{direct.url}/v2/models/digits/infer", rows, *load))
        results["bare_grpc"] = asyncio.run(_grpc_load(f"127.0.0.1:{bare_grpc}", rows, *load))
        results["kubeml_canary_grpc"] = asyncio.run(_grpc_load(router.grpc_target, rows, *load))
        results["kubeml_direct_grpc"] = asyncio.run(_grpc_load(f"127.0.0.1:{grpc_port}", rows, *load))
        split = router.stats()["totals"]
    finally:
        backend.stop()
        backend.manager.stop("digits-grpc")
        bare.terminate()
        bare.wait(30)
    onnx = _onnx_vs_eager(bundle, rows)

    def ratio(a: str, b: str, key: str) -> float:
        return results[a][key] / results[b][key]

    ratios = {
        "kubeml_canary/bare REST throughput": ratio("kubeml_canary_rest", "bare_rest", "rps"),
        "kubeml_canary/bare REST p99": ratio("kubeml_canary_rest", "bare_rest", "p99_ms"),
        "kubeml_direct/bare REST throughput": ratio("kubeml_direct_rest", "bare_rest", "rps"),
        "kubeml_canary/bare gRPC throughput": ratio("kubeml_canary_grpc", "bare_grpc", "rps"),
        "kubeml_canary/bare gRPC p99": ratio("kubeml_canary_grpc", "bare_grpc", "p99_ms"),
        "bare gRPC/REST throughput": ratio("bare_grpc", "bare_rest", "rps"),
        "kubeml_canary gRPC/REST throughput (router)": ratio("kubeml_canary_grpc", "kubeml_canary_rest", "rps"),
        "kubeml gRPC/REST throughput (direct)": ratio("kubeml_direct_grpc", "kubeml_direct_rest", "rps"),
        "onnxruntime/pytorch p50 latency": onnx["onnxruntime"]["p50_ms"] / onnx["pytorch_eager"]["p50_ms"],
    }
    lines = ["| run | requests | errors | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")  # fmt: skip
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += ["", "| in-process, batch 1 | p50 ms | p99 ms |", "|---|---|---|"]
    lines += [f"| {k} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} |" for k, v in onnx.items()]
    lines += ["", f"Canary split during the kubeml runs, REST and gRPC (router totals): stable "
              f"{split['stable']['requests']}, canary {split['canary']['requests']} requests, "
              f"errors {split['stable']['errors'] + split['canary']['errors']}."]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    load_avg = os.getloadavg()
    if not args.no_write:
        section = (
            f"\n## Serving: bare KServe vs kubeml with a canary split ({date.today().isoformat()})\n\n"
            f"Machine: 2 cores, 24 GiB, shared with other builds (load average at the end "
            f"{load_avg[0]:.1f}); Python {platform.python_version()}. "
            f"Closed loop, concurrency {args.concurrency}, {args.seconds:.0f} s per run, 1-row V2 "
            f"requests, digits CNN. Script: `benchmarks/serving/bench_serving.py`.\n\n{table}\n"
        )
        with RESULTS.open("a", encoding="utf-8") as f:
            if f.tell() == 0:
                f.write("# Benchmark results\n")
            f.write(section)


if __name__ == "__main__":
    main()
