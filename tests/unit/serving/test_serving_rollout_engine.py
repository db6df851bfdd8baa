"""The engine's decision logic against a scripted backend (fast; the real router and
servers are exercised in test_serving_rollout.py).

The scripted backend plays back measured windows and records every call the engine makes,
so the tests read as the sequence of traffic changes an operator would see.
"""

from __future__ import annotations

import json
import threading

from kubeml.errors import ServingError
from kubeml.serving.rollout import BackendMetrics, DecisionLog, RolloutEngine, RolloutPolicy, WindowMetrics

GOOD = WindowMetrics(BackendMetrics(100, 0, 2, 5), BackendMetrics(50, 0, 2, 6), 50, 0, 0.05)
BAD = WindowMetrics(BackendMetrics(100, 0, 2, 5), BackendMetrics(50, 25, 2, 6), 50, 0, 0.05)
QUIET = WindowMetrics(BackendMetrics(100, 0, 2, 5), BackendMetrics(1, 0, 2, 6), 0, 0, 0.05)


class ScriptedBackend:
    model, stable_version, canary_version = "digits", "1", "2"

    def __init__(self, windows, *, fail_start: bool = False):
        self.windows = list(windows)
        self.fail_start = fail_start
        self.calls: list[tuple] = []

    def start_canary(self):
        self.calls.append(("start",))
        if self.fail_start:
            raise ServingError("checksum mismatch")

    def set_traffic(self, *, weight, mirror):
        self.calls.append(("traffic", weight, mirror))

    def metrics(self, since):
        return self.windows.pop(0) if len(self.windows) > 1 else self.windows[0]

    def promote(self):
        self.calls.append(("promote",))

    def rollback(self):
        self.calls.append(("rollback",))


def _engine(backend, tmp_path, **policy):
    policy = RolloutPolicy(**{"interval_s": 0.05, "min_requests": 10, **policy})
    return RolloutEngine(
        backend, policy, DecisionLog(tmp_path / "d.jsonl"),
        control_file=tmp_path / "control.json", state_file=tmp_path / "state.json",
    )  # fmt: skip


def test_good_canary_walks_every_step_then_promotes(tmp_path):
    backend = ScriptedBackend([GOOD])
    result = _engine(backend, tmp_path, steps=(10, 50, 100)).run()
    assert result.outcome == "promoted" and result.max_weight == 100
    assert backend.calls == [("start",), ("traffic", 10, False), ("traffic", 50, False),
                             ("traffic", 100, False), ("promote",)]  # fmt: skip
    assert json.loads((tmp_path / "state.json").read_text())["phase"] == "promoted"


def test_failure_limit_counts_failed_windows_across_the_rollout(tmp_path):
    backend = ScriptedBackend([BAD, GOOD, BAD])
    result = _engine(backend, tmp_path, steps=(10, 50, 100), failure_limit=2).run()
    assert result.outcome == "rolled_back"
    assert backend.calls[-1] == ("rollback",)
    # one bad window at 10 is tolerated, the second (at 50) hits the limit
    assert ("traffic", 100, False) not in backend.calls and result.max_weight == 50


def test_inconclusive_windows_extend_then_roll_back_for_lack_of_evidence(tmp_path):
    backend = ScriptedBackend([QUIET])
    result = _engine(backend, tmp_path, max_inconclusive=3).run()
    assert result.outcome == "rolled_back" and "without enough canary traffic" in result.reason
    verdicts = [d["verdict"] for d in DecisionLog(tmp_path / "d.jsonl").read() if d["action"] == "analysis"]
    assert verdicts == ["inconclusive"] * 3


def test_canary_that_fails_to_start_never_gets_traffic(tmp_path):
    backend = ScriptedBackend([GOOD], fail_start=True)
    result = _engine(backend, tmp_path).run()
    assert (result.outcome, result.max_weight) == ("rolled_back", 0)
    assert backend.calls == [("start",)]


def test_blue_green_switches_at_once_and_switches_back_on_a_bad_bake(tmp_path):
    backend = ScriptedBackend([GOOD, BAD])
    result = _engine(backend, tmp_path, steps=(100,), strategy="bluegreen", shadow_analyses=1,
                     failure_limit=1).run()  # fmt: skip
    assert result.outcome == "rolled_back"
    assert backend.calls == [("start",), ("traffic", 0, True), ("traffic", 100, False), ("rollback",)]


def test_operator_abort_rolls_back_mid_step(tmp_path):
    backend = ScriptedBackend([QUIET])
    engine = _engine(backend, tmp_path, interval_s=5.0)
    timer = threading.Timer(0.3, lambda: (tmp_path / "control.json").write_text('{"command": "abort"}'))
    timer.start()
    result = engine.run()
    assert result.outcome == "aborted" and backend.calls[-1] == ("rollback",)
    assert not (tmp_path / "control.json").exists()


def test_operator_promote_skips_the_remaining_steps(tmp_path):
    backend = ScriptedBackend([QUIET])
    engine = _engine(backend, tmp_path, interval_s=5.0, steps=(10, 50, 100))
    threading.Timer(0.3, lambda: (tmp_path / "control.json").write_text('{"command": "promote"}')).start()
    result = engine.run()
    assert result.outcome == "promoted"
    assert backend.calls == [("start",), ("traffic", 10, False), ("traffic", 100, False), ("promote",)]
