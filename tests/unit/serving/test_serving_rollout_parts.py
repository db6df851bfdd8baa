"""Fast checks of the rollout's parts: policy, analysis, routes, telemetry, manifests, CLI."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from kubeml.serving.inferenceservice import (
    PredictorConfig,
    Resources,
    inference_service,
    with_canary,
)
from kubeml.serving.rollout import (
    BackendMetrics,
    Decision,
    DecisionLog,
    RolloutPolicy,
    Routes,
    WindowMetrics,
    analyse,
)
from kubeml.serving.telemetry import ErrorSchedule, FaultInjection, PayloadLogger, TelemetryMiddleware, infer_route


def _window(canary=BackendMetrics(100, 0, 5, 20), stable=BackendMetrics(900, 0, 5, 20), compared=100, differing=0):
    return WindowMetrics(stable, canary, compared, differing, 10.0)


@pytest.mark.parametrize(
    "policy, message",
    [
        (dict(steps=(10, 50)), "end at 100"),
        (dict(steps=(50, 10, 100)), "increasing"),
        (dict(steps=(0, 100)), "increasing"),
        (dict(steps=(10, 100), strategy="bluegreen"), "blue/green"),
        (dict(interval_s=0), "interval_s"),
        (dict(failure_limit=0), "failure_limit"),
        (dict(max_error_rate=2), "max_error_rate"),
    ],
)
def test_invalid_policies_fail_at_construction_with_the_fix(policy, message):
    with pytest.raises(ValueError, match=message):
        RolloutPolicy(**policy)


def test_steps_parse_from_the_cli_form():
    assert RolloutPolicy.parse_steps("10,50,100") == (10, 50, 100)
    with pytest.raises(ValueError, match="comma-separated"):
        RolloutPolicy.parse_steps("10;50")


def test_analysis_passes_a_healthy_canary():
    assert analyse(_window(), RolloutPolicy()).verdict == "pass"


def test_analysis_is_inconclusive_without_enough_canary_requests():
    result = analyse(_window(canary=BackendMetrics(3, 3, 1, 1)), RolloutPolicy(min_requests=20))
    assert result.verdict == "inconclusive" and "3 canary requests" in result.reasons[0]


def test_analysis_names_every_failed_check():
    policy = RolloutPolicy(max_p99_ms=100, max_p99_ratio=2.0, max_divergence=0.1)
    window = _window(canary=BackendMetrics(100, 10, 5, 400), compared=100, differing=30)
    result = analyse(window, policy)
    assert result.verdict == "fail"
    assert [r.split()[0] for r in result.reasons] == ["error", "p99", "p99", "prediction"]


def test_divergence_needs_enough_compared_instances():
    window = _window(compared=5, differing=5)
    assert analyse(window, RolloutPolicy(min_compared=20)).verdict == "pass"


def test_window_metrics_serialise_with_rates():
    d = _window(canary=BackendMetrics(10, 5, 1, 2)).to_dict()
    assert d["canary"]["error_rate"] == 0.5 and d["divergence"] == 0.0


@pytest.mark.parametrize(
    "routes, message",
    [
        (dict(stable="localhost:1"), "http"),
        (dict(stable="http://a", weight=10), "need a canary"),
        (dict(stable="http://a", canary="http://b", weight=101), "0..100"),
        (dict(stable="http://a", bogus=1), "unknown route fields"),
    ],
)
def test_invalid_routes_are_refused(routes, message):
    with pytest.raises(ValueError, match=message):
        Routes.from_dict(routes)


def test_decision_log_round_trips_and_filters_by_rollout(tmp_path):
    seen = []
    log = DecisionLog(tmp_path / "d.jsonl", listener=seen.append)
    for rid in ("a", "b", "a"):
        log.append(Decision(rid, "digits", "1", "2", "analysis", 10, verdict="pass", metrics={"x": 1}))
    assert [d["rollout_id"] for d in log.read()] == ["a", "b", "a"]
    assert len(log.read("a")) == 2 and len(seen) == 3


def test_infer_routes_are_recognised():
    assert infer_route("/v2/models/m/versions/3/infer") == ("m", "v2")
    assert infer_route("/v2/models/m/ready") is None
    assert infer_route("/metrics") is None


def test_fault_injection_spreads_errors_evenly():
    mw = TelemetryMiddleware(None, versions={}, fault=FaultInjection(error_rate=0.5))
    pattern = [mw._errors.next_fails() for _ in range(10)]
    assert pattern == [False, True] * 5
    quarter = ErrorSchedule(0.25)
    assert [quarter.next_fails() for _ in range(8)] == [False, False, False, True] * 2
    assert not any(ErrorSchedule(0.0).next_fails() for _ in range(5))
    assert all(ErrorSchedule(1.0).next_fails() for _ in range(5))
    with pytest.raises(ValueError, match="error_rate"):
        FaultInjection(error_rate=1.5)


def test_payload_logger_writes_sampled_jsonl(tmp_path):
    sink = tmp_path / "payloads" / "m.jsonl"
    logger = PayloadLogger(sink, sample_rate=0.5, seed=1)
    sampled = sum(logger.sampled() for _ in range(1000))
    assert 400 < sampled < 600
    for i in range(3):
        logger.submit({"request_id": str(i), "version": "3"})
    logger.close()
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [r["request_id"] for r in lines] == ["0", "1", "2"]


def _predictor(**kwargs) -> PredictorConfig:
    return PredictorConfig(
        image="img:1", storage_uri="s3://b/digits/3", model_name="digits", version="3", **kwargs
    )


def test_gpu_predictors_select_and_tolerate_gpu_nodes():
    spec = inference_service("digits", _predictor(resources=Resources(gpus=1)))["spec"]["predictor"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu = inference_service("digits", _predictor())["spec"]["predictor"]
    assert "nodeSelector" not in cpu and "tolerations" not in cpu


def test_predictors_request_and_bound_their_ephemeral_storage():
    resources = inference_service("digits", _predictor())["spec"]["predictor"]["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == "1Gi"
    assert resources["limits"]["ephemeral-storage"] == "10Gi"
    big = Resources(ephemeral_storage="20Gi", ephemeral_storage_limit="60Gi").to_dict()
    assert (big["requests"]["ephemeral-storage"], big["limits"]["ephemeral-storage"]) == ("20Gi", "60Gi")
    unbounded = Resources(ephemeral_storage=None, ephemeral_storage_limit=None).to_dict()
    assert "ephemeral-storage" not in unbounded["requests"] and "ephemeral-storage" not in unbounded["limits"]
    with pytest.raises(ValueError, match="both ephemeral_storage and ephemeral_storage_limit"):
        Resources(ephemeral_storage_limit=None)


def test_canary_shape_depends_on_deployment_mode():
    canary = PredictorConfig(image="img:1", storage_uri="s3://b/digits/4", model_name="digits", version="4")
    knative = with_canary(inference_service("digits", _predictor()), canary, 10)
    assert knative["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert knative["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    standard = with_canary(inference_service("digits", _predictor(), mode="standard"), canary, 10)
    assert standard["spec"]["predictor"]["labels"]["kubeml.io/version"] == "3"
    assert standard["spec"]["canary"][0]["trafficPercent"] == 10
    assert standard["spec"]["canary"][0]["predictor"]["labels"]["kubeml.io/version"] == "4"


def test_predictor_config_validates_replicas_and_uri():
    with pytest.raises(ValueError, match="replicas"):
        _predictor(min_replicas=4, max_replicas=2)
    with pytest.raises(ValueError, match="URI"):
        PredictorConfig(image="i", storage_uri="/local", model_name="m", version="1")


# -- CLI --------------------------------------------------------------------------------------


def _cli():
    import typer

    from kubeml.cli.rollout import register

    app = typer.Typer()
    register(app)
    return app


def test_deploy_refuses_a_registry_version_that_is_not_approved(tmp_path, monkeypatch):
    from kubeml.config import load_config
    from kubeml.registry import Registry

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, "dev")
    reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
    mv = reg.register("digits", f"{cfg.artifact_store.uri}/bundles/x", metrics={"accuracy": 0.9}, auto_approve=False)
    result = CliRunner().invoke(_cli(), ["deploy", "digits", "--version", str(mv.version)])
    assert result.exit_code == 1
    assert "pending, not approved" in result.output and "kubeml models approve" in result.output
    assert not (tmp_path / ".kubeml" / "serving" / "rollouts").exists()  # nothing started


def test_rollout_status_shows_decisions_with_their_metrics(tmp_path):
    rollout = tmp_path / "rollouts" / "digits"
    log = DecisionLog(rollout / "decisions.jsonl")
    metrics = _window(canary=BackendMetrics(40, 20, 3, 12)).to_dict()
    log.append(Decision("r1", "digits", "1", "2", "traffic", 10))
    log.append(Decision("r1", "digits", "1", "2", "analysis", 10, verdict="fail",
                        reasons=("error rate 0.500 > 0.050",), metrics=metrics))  # fmt: skip
    (rollout / "state.json").write_text(json.dumps({
        "rollout_id": "r1", "model": "digits", "stable_version": "1", "canary_version": "2",
        "phase": "rolled_back", "weight": 0, "mirror": False, "failures": 2, "steps": [10, 50, 100],
        "strategy": "canary", "pid": 1, "updated_at": time.time(),
    }))  # fmt: skip
    result = CliRunner().invoke(_cli(), ["rollout", "status", "digits", "--state-dir", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "not served" in result.output and "rolled_back" in result.output
    assert "0.500" in result.output and "error rate 0.500 > 0.050" in result.output


def test_rollout_abort_without_a_rollout_says_so(tmp_path):
    result = CliRunner().invoke(_cli(), ["rollout", "abort", "digits", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no rollout in progress" in result.output
