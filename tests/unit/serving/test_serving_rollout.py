"""Rollouts against real model servers behind the real router.

One stable version (and its router) serves the whole module; each test brings up a canary
from a real bundle. Faulty canaries use the server's fault-injection hook (503s, added
latency) or a corrupt bundle; the engine, router and servers are the production code.
The promotion test changes the stable version, so it runs last.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from kubeml.config import load_config
from kubeml.serving.rollout import (
    DecisionLog,
    LocalBackend,
    RolloutEngine,
    RolloutPolicy,
    TrafficReplayer,
)
from kubeml.serving.rollout.local import instance_name
from kubeml.serving.telemetry import FaultInjection
from kubeml.testing.serving import register_bundle

from tests.unit.serving.conftest import write_digits_bundle

MODEL = "digits"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rollout-state")


@pytest.fixture(scope="module")
def backend(state_dir: Path, digits_bundle: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(MODEL, state_dir=state_dir, payload_sample_rate=0.5)
    try:
        backend.deploy_stable(digits_bundle, "1")
        yield backend
    finally:
        backend.stop()


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 17, size=(64, 64)).astype(np.float32)


def _router(backend: LocalBackend):
    router = backend.router()
    assert router is not None
    return router


def _run(backend: LocalBackend, bundle: Path, version: str, policy: RolloutPolicy, *, fault=None):
    backend.prepare_canary(bundle, version, fault=fault)
    engine = RolloutEngine(
        backend,
        policy,
        DecisionLog(backend.decisions_file),
        control_file=backend.control_file,
        state_file=backend.state_file,
    )
    return engine.run(), engine


def test_canary_answering_half_5xx_is_rolled_back_at_the_first_step(backend, digits_bundle, rows):
    router = _router(backend)
    before = router.stats()["totals"]
    policy = RolloutPolicy(
        steps=(10, 50, 100), interval_s=2.0, failure_limit=2, min_requests=8, max_p99_ms=None
    )
    with TrafficReplayer(router.url, MODEL, rows, concurrency=4, rate_per_s=None) as traffic:
        result, engine = _run(
            backend, digits_bundle, "2", policy, fault=FaultInjection(error_rate=0.5)
        )
        # Keep the stable path busy until it has served 1000 requests in this test.
        deadline = time.monotonic() + 240
        while router.stats()["totals"]["stable"]["requests"] - before["stable"]["requests"] < 1000:
            assert time.monotonic() < deadline, "stable did not reach 1000 requests"
            time.sleep(0.5)
    seen = traffic.stats()

    assert result.outcome == "rolled_back"
    assert "error rate" in result.reason
    assert result.max_weight == 10  # never beyond the first step
    totals = router.stats()["totals"]
    assert totals["stable"]["requests"] - before["stable"]["requests"] >= 1000
    assert totals["stable"]["errors"] == before["stable"]["errors"] == 0
    assert totals["canary"]["errors"] - before["canary"]["errors"] > 0  # the canary did fail
    assert seen.failures == 0, seen.by_status  # users got stable's answer instead
    routes = router.routes()
    assert routes.canary is None and routes.stable_version == "1"
    assert backend.manager.get(instance_name(MODEL, "2")) is None  # canary server stopped

    decisions = DecisionLog(backend.decisions_file).read(result.rollout_id)
    analyses = [d for d in decisions if d["action"] == "analysis"]
    verdicts = [d["verdict"] for d in analyses]
    assert verdicts.count("fail") == 2 and verdicts[-1] == "fail"  # the failure limit
    assert analyses[-1]["metrics"]["canary"]["error_rate"] > 0.3
    assert decisions[-1]["action"] == "rollback" and decisions[-1]["weight"] == 0
    assert max(d["weight"] for d in decisions) == 10
    state = json.loads(backend.state_file.read_text())
    assert state["phase"] == "rolled_back" and state["rollout_id"] == result.rollout_id


def test_slow_canary_is_rolled_back_on_p99(backend, digits_bundle, rows):
    router = _router(backend)
    policy = RolloutPolicy(
        steps=(20, 100), interval_s=3.0, failure_limit=1, min_requests=5, max_p99_ms=600.0
    )
    with TrafficReplayer(router.url, MODEL, rows, concurrency=4, rate_per_s=None) as traffic:
        result, _ = _run(
            backend, digits_bundle, "3", policy, fault=FaultInjection(latency_ms=1500)
        )
    assert result.outcome == "rolled_back"
    assert "p99" in result.reason
    assert result.max_weight == 20
    assert traffic.stats().failures == 0
    analysis = [
        d for d in DecisionLog(backend.decisions_file).read(result.rollout_id)
        if d["action"] == "analysis"
    ][-1]
    assert analysis["metrics"]["canary"]["p99_ms"] >= 1500


def test_canary_that_cannot_load_gets_no_traffic(backend, digits_bundle, rows, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(digits_bundle, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    router = _router(backend)
    before = router.stats()["totals"]["canary"]["requests"]
    with TrafficReplayer(router.url, MODEL, rows, concurrency=2, rate_per_s=50) as traffic:
        result, _ = _run(backend, broken, "4", RolloutPolicy(interval_s=1.0))
    assert result.outcome == "rolled_back"
    assert result.max_weight == 0
    assert "checksum mismatch" in result.reason
    assert router.stats()["totals"]["canary"]["requests"] == before
    assert router.routes().canary is None
    assert traffic.stats().failures == 0
    actions = [d["action"] for d in DecisionLog(backend.decisions_file).read(result.rollout_id)]
    assert actions == ["start", "canary_failed"]


def test_divergent_canary_in_shadow_mode_is_rolled_back_without_answering_anyone(
    backend, tmp_path, rows
):
    other = write_digits_bundle(tmp_path / "other", seed=11)  # different weights, other answers
    router = _router(backend)
    policy = RolloutPolicy(
        steps=(10, 100), interval_s=2.0, shadow_analyses=1, failure_limit=1, min_requests=5,
        min_compared=5, max_divergence=0.05, max_p99_ms=None,
    )
    with TrafficReplayer(router.url, MODEL, rows, concurrency=2, rate_per_s=None) as traffic:
        result, _ = _run(backend, other, "5", policy)
    assert result.outcome == "rolled_back"
    assert "divergence" in result.reason
    assert result.max_weight == 0
    assert traffic.stats().by_backend.get("canary", 0) == 0  # shadow answers from stable only
    decisions = DecisionLog(backend.decisions_file).read(result.rollout_id)
    assert any(d["mirror"] for d in decisions if d["action"] == "traffic")


def test_predict_batch_writes_predictions_with_the_answering_version(backend, rows, digits_bundle, tmp_path):
    import pandas as pd

    from kubeml.serving.model import BundleModel

    frame = pd.DataFrame(rows, columns=[f"px{i}" for i in range(64)]).assign(row_id=range(len(rows)))
    frame.to_parquet(tmp_path / "in.parquet")
    result = CliRunner().invoke(
        _cli(),
        ["predict-batch", MODEL, "-i", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out.csv"),
         "--exclude", "row_id", "--batch-size", "10", "--state-dir", str(backend.state_dir)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = pd.read_csv(tmp_path / "out.csv")
    expected, _ = BundleModel("d", digits_bundle).predict_array(rows)
    assert out["prediction"].tolist() == expected.tolist()
    assert out["row_id"].tolist() == list(range(len(rows)))
    assert set(out["model_version"].astype(str)) == {"1"}


def _cli():
    import typer

    from kubeml.cli.rollout import register

    app = typer.Typer()
    register(app)
    return app


def test_good_canary_is_promoted_step_by_step_through_the_cli(backend, digits_bundle, rows, state_dir, tmp_path,
                                                                project):
    # --bundle serves the registered bundle of version 6 (the embedded dev registry, in project).
    assert register_bundle(load_config(None, None), digits_bundle, model=MODEL, versions=6) == 6
    router = _router(backend)
    np.save(tmp_path / "heldout.npy", rows)
    result = CliRunner().invoke(
        _cli(),
        ["deploy", MODEL, "--version", "6", "--bundle", str(digits_bundle), "--steps", "10,50,100",
         "--interval", "1.5", "--min-requests", "5", "--replay", str(tmp_path / "heldout.npy"),
         "--replay-rate", "0", "--payload-sample-rate", "0.5", "--port", str(router.port),
         "--state-dir", str(state_dir)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "promoted digits: serving version 6" in result.output
    routes = router.routes()
    assert (routes.stable_version, routes.canary) == ("6", None)
    state = json.loads(backend.state_file.read_text())
    decisions = DecisionLog(backend.decisions_file).read(state["rollout_id"])
    weights = [d["weight"] for d in decisions if d["action"] == "traffic"]
    assert weights == [10, 50, 100]
    assert decisions[-1]["action"] == "promote"
    assert backend.manager.get(instance_name(MODEL, "1")) is None  # old stable retired
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": rows[0].tolist()}]}
    answer = requests.post(f"{router.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert answer.status_code == 200
    assert answer.json()["model_version"] == "6"
    assert answer.headers["x-kubeml-model-version"] == "6"

    status = CliRunner().invoke(_cli(), ["rollout", "status", MODEL, "--state-dir", str(state_dir)])
    assert status.exit_code == 0, status.output
    assert "stable 6" in status.output and "phase promoted" in status.output
    assert status.output.count("analysis") >= 3 and "canary" in status.output

    # Payload logs of the promoted version carry its version and request ids.
    log = state_dir / "payloads" / f"{instance_name(MODEL, '6')}.jsonl"
    deadline = time.monotonic() + 10
    while not (log.is_file() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    record = json.loads(log.read_text().splitlines()[0])
    assert record["version"] == "6" and record["request_id"] and record["status"] == 200
    # Prometheus metrics per model and version on the server.
    served = backend.manager.get(instance_name(MODEL, "6"))
    metrics = requests.get(f"{served.url}/metrics", timeout=10).text
    assert 'kubeml_requests_total{model="digits",protocol="v2",status="200",version="6"}' in metrics
    assert 'kubeml_batch_size_bucket{le="1.0",model="digits",version="6"}' in metrics
    assert 'kubeml_predictions_total{class=' in metrics
