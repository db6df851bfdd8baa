"""The rollout engine: step a canary through traffic weights, analyse, promote or roll back.

Where it sits: one engine, two backends. :class:`~kubeml.serving.rollout.local.LocalBackend`
drives the local router; :class:`~kubeml.serving.rollout.cluster.InferenceServiceBackend`
patches a KServe ``InferenceService`` and reads Prometheus. The engine only sees the
:class:`RolloutBackend` protocol, so the decisions and their log are the same on both.

The loop, for each traffic step (e.g. 10 -> 50 -> 100 percent)::

    set traffic -> every interval: measure the window, analyse it
        fail          -> failures += 1; at the failure limit: roll back, stop
        pass          -> after `analyses_per_step` passes: next step (after 100: promote)
        inconclusive  -> too little canary traffic to judge: the window is extended; after
                         `max_inconclusive` in a row: roll back (a canary nobody can
                         measure is not promoted)

Every decision is appended to a JSONL log with the metrics behind it (:class:`DecisionLog`).
An operator can steer a running rollout through a control file (``promote`` skips to full
traffic and promotes; ``abort`` rolls back at once).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from kubeml._files import atomic_write_text
from kubeml.errors import ServingError

__all__ = [
    "Analysis",
    "BackendMetrics",
    "Decision",
    "DecisionLog",
    "RolloutBackend",
    "RolloutEngine",
    "RolloutPolicy",
    "RolloutResult",
    "WindowMetrics",
    "analyse",
]

Verdict = Literal["pass", "fail", "inconclusive"]
Strategy = Literal["canary", "bluegreen"]


@dataclass(frozen=True)
class RolloutPolicy:
    """How a canary is stepped and judged. Defaults suit a small CPU model served locally."""

    steps: tuple[int, ...] = (10, 50, 100)
    """Canary traffic percentages, increasing, ending at 100. Blue/green uses ``(100,)``."""
    interval_s: float = 10.0
    """Seconds of traffic per analysis window."""
    analyses_per_step: int = 1
    """Passing analyses needed at a step before moving to the next one."""
    failure_limit: int = 2
    """Failed analyses (over the whole rollout) that trigger a rollback. 1 rolls back on the
    first bad window; 2 tolerates one noisy window on a loaded machine."""
    max_error_rate: float = 0.05
    """Highest tolerated share of canary requests answered 5xx (or not answered)."""
    max_p99_ms: float | None = 1000.0
    """Highest tolerated canary p99 latency in ms, as measured by the router (None: off)."""
    max_p99_ratio: float | None = None
    """Highest tolerated canary p99 / stable p99 (None: off). Relative thresholds are
    noisy on shared machines; prefer ``max_p99_ms`` there."""
    max_divergence: float | None = 0.2
    """Highest tolerated share of instances whose predicted class differs from stable's
    (None: off). A retrained model legitimately changes some answers; 20% does not."""
    min_requests: int = 20
    """Canary requests a window needs before it is judged at all."""
    min_compared: int = 20
    """Compared instances a window needs before divergence is judged."""
    max_inconclusive: int = 6
    """Inconclusive windows in a row (too little traffic) before rolling back."""
    shadow_analyses: int = 0
    """Passing analyses in shadow (mirror) mode before the first split step; 0: none."""
    strategy: Strategy = "canary"
    """``canary`` steps the weight; ``bluegreen`` switches all traffic at once after the
    shadow phase and keeps the old version warm until the bake analyses pass, so a
    rollback is an instant switch back."""

    def __post_init__(self) -> None:
        steps = tuple(int(s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        if not steps or steps[-1] != 100:
            raise ValueError(f"steps must end at 100 (full traffic), got {list(steps)}")
        if any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"steps must be increasing percentages in 1..100, got {list(steps)}")
        if self.strategy == "bluegreen" and steps != (100,):
            raise ValueError("blue/green switches all traffic at once: use steps (100,)")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {self.interval_s}")
        for name in ("analyses_per_step", "failure_limit", "min_requests", "max_inconclusive"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")

    @classmethod
    def parse_steps(cls, text: str) -> tuple[int, ...]:
        """``"10,50,100"`` -> ``(10, 50, 100)``, with a message that says what is wrong.

        >>> RolloutPolicy.parse_steps("10, 50,100")
        (10, 50, 100)
        """
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(
                f"steps {text!r} must be comma-separated percentages, e.g. 10,50,100"
            ) from None


@dataclass(frozen=True)
class BackendMetrics:
    """One side's traffic in an analysis window."""

    requests: int = 0
    errors: int = 0
    """Requests answered 5xx or not at all."""
    p50_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class WindowMetrics:
    """What a backend measured over one analysis window."""

    stable: BackendMetrics
    canary: BackendMetrics
    compared: int = 0
    """Instances answered by both sides and compared."""
    differing: int = 0
    """Of those, instances whose predicted class differs."""
    window_s: float = 0.0

    @property
    def divergence(self) -> float:
        return self.differing / self.compared if self.compared else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for side in ("stable", "canary"):
            d[side]["error_rate"] = round(getattr(self, side).error_rate, 4)
        d["divergence"] = round(self.divergence, 4)
        return d


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    reasons: tuple[str, ...]
    """Why: the failed checks, or what was missing; empty when everything passed."""


def analyse(m: WindowMetrics, policy: RolloutPolicy) -> Analysis:
    """Judge one window against the policy's thresholds.

    >>> ok = WindowMetrics(BackendMetrics(200, 0, 3, 9), BackendMetrics(40, 0, 3, 10), 40, 1)
    >>> analyse(ok, RolloutPolicy()).verdict
    'pass'
    >>> bad = replace(ok, canary=BackendMetrics(40, 20, 3, 10))
    >>> analyse(bad, RolloutPolicy()).reasons
    ('error rate 0.500 > 0.050',)
    """
    c, s = m.canary, m.stable
    if c.requests < policy.min_requests:
        return Analysis(
            "inconclusive", (f"{c.requests} canary requests < {policy.min_requests} needed",)
        )
    failed = []
    if c.error_rate > policy.max_error_rate:
        failed.append(f"error rate {c.error_rate:.3f} > {policy.max_error_rate:.3f}")
    if policy.max_p99_ms is not None and c.p99_ms > policy.max_p99_ms:
        failed.append(f"p99 {c.p99_ms:.1f} ms > {policy.max_p99_ms:.1f} ms")
    if (
        policy.max_p99_ratio is not None
        and s.requests >= policy.min_requests
        and s.p99_ms > 0
        and c.p99_ms / s.p99_ms > policy.max_p99_ratio
    ):
        failed.append(
            f"p99 {c.p99_ms:.1f} ms is {c.p99_ms / s.p99_ms:.2f}x stable's "
            f"{s.p99_ms:.1f} ms > {policy.max_p99_ratio:.2f}x"
        )
    if (
        policy.max_divergence is not None
        and m.compared >= policy.min_compared
        and m.divergence > policy.max_divergence
    ):
        failed.append(
            f"prediction divergence {m.divergence:.3f} > {policy.max_divergence:.3f} "
            f"({m.differing}/{m.compared} instances)"
        )
    return Analysis("fail", tuple(failed)) if failed else Analysis("pass", ())


@dataclass(frozen=True)
class Decision:
    """One line of the decision log."""

    rollout_id: str
    model: str
    stable_version: str
    canary_version: str
    action: str
    """start | canary_failed | traffic | analysis | step | promote | rollback | abort"""
    weight: int
    mirror: bool = False
    verdict: str = ""
    reasons: tuple[str, ...] = ()
    metrics: dict[str, Any] | None = None
    failures: int = 0
    ts: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class DecisionLog:
    """Append-only JSONL of :class:`Decision` records, plus a listener for live output."""

    def __init__(self, path: str | Path, *, listener: Callable[[Decision], None] | None = None):
        self.path = Path(path)
        self.listener = listener

    def append(self, decision: Decision) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(decision.to_json() + "\n")
        if self.listener is not None:
            self.listener(decision)

    def read(self, rollout_id: str | None = None) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [r for r in records if rollout_id is None or r["rollout_id"] == rollout_id]


class RolloutBackend(Protocol):
    """What the engine needs from a serving target."""

    model: str
    stable_version: str
    canary_version: str

    def start_canary(self) -> None:
        """Bring up the canary with no traffic; raise ``ServingError`` if it cannot load."""

    def set_traffic(self, *, weight: int, mirror: bool) -> None:
        """Send ``weight`` percent to the canary (or mirror copies to it)."""

    def metrics(self, since: float) -> WindowMetrics:
        """Traffic measured from unix time ``since`` until now."""

    def promote(self) -> None:
        """Make the canary the stable version; retire the old stable."""

    def rollback(self) -> None:
        """All traffic to stable; retire the canary."""


class TrafficSource(Protocol):
    """Generated traffic (replayed held-out data) for when there is no live traffic."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class RolloutResult:
    rollout_id: str
    outcome: Literal["promoted", "rolled_back", "aborted"]
    reason: str
    max_weight: int
    """Highest canary weight the rollout reached (0 if the canary never got traffic)."""
    decisions: int


class RolloutEngine:
    """Runs one rollout to its end; see the module docstring for the loop.

    ``control_file``, when given, is polled between ticks for ``{"command": "promote"}``
    or ``{"command": "abort"}`` (written by ``kubeml rollout promote|abort``);
    ``state_file`` is rewritten on every decision for ``kubeml rollout status``.
    """

    #: Seconds between control-file polls inside an analysis interval.
    TICK_S = 0.2

    def __init__(
        self,
        backend: RolloutBackend,
        policy: RolloutPolicy,
        log: DecisionLog,
        *,
        traffic: TrafficSource | None = None,
        control_file: str | Path | None = None,
        state_file: str | Path | None = None,
        rollout_id: str | None = None,
    ):
        self.backend = backend
        self.policy = policy
        self.log = log
        self.traffic = traffic
        self.control_file = Path(control_file) if control_file else None
        self.state_file = Path(state_file) if state_file else None
        self.rollout_id = rollout_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.weight = 0
        self.mirror = False
        self.max_weight = 0
        self.failures = 0
        self.decisions = 0
        self.phase = "starting"

    # -- bookkeeping -------------------------------------------------------------------------

    def _decide(self, action: str, **kwargs: Any) -> None:
        decision = Decision(
            rollout_id=self.rollout_id,
            model=self.backend.model,
            stable_version=self.backend.stable_version,
            canary_version=self.backend.canary_version,
            action=action,
            weight=self.weight,
            mirror=self.mirror,
            failures=self.failures,
            **kwargs,
        )
        self.log.append(decision)
        self.decisions += 1
        self._write_state()

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        state = {
            "rollout_id": self.rollout_id,
            "model": self.backend.model,
            "stable_version": self.backend.stable_version,
            "canary_version": self.backend.canary_version,
            "phase": self.phase,
            "weight": self.weight,
            "mirror": self.mirror,
            "failures": self.failures,
            "steps": list(self.policy.steps),
            "strategy": self.policy.strategy,
            "pid": os.getpid(),
            "updated_at": time.time(),
        }
        atomic_write_text(self.state_file, json.dumps(state, indent=2), fsync=False)

    def _command(self) -> str | None:
        if self.control_file is None or not self.control_file.is_file():
            return None
        try:
            command = json.loads(self.control_file.read_text()).get("command")
        except (ValueError, OSError, AttributeError):
            command = None
        self.control_file.unlink(missing_ok=True)
        return command if command in ("promote", "abort") else None

    def _set(self, weight: int, mirror: bool) -> None:
        self.backend.set_traffic(weight=weight, mirror=mirror)
        self.weight, self.mirror = weight, mirror
        self.max_weight = max(self.max_weight, weight)
        self._decide("traffic")

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> RolloutResult:
        self.phase = "starting"
        self._decide("start", metrics={"policy": asdict(self.policy)})
        try:
            self.backend.start_canary()
        except ServingError as exc:
            self.phase = "rolled_back"
            self._decide("canary_failed", reasons=(f"canary did not become ready: {exc}",))
            return self._result("rolled_back", f"canary failed to start: {exc}")
        if self.traffic is not None:
            self.traffic.start()
        try:
            return self._run_phases()
        except BaseException:
            # Whatever went wrong (including Ctrl-C), users go back to the known-good version.
            self.backend.rollback()
            self.weight, self.mirror, self.phase = 0, False, "rolled_back"
            self._decide("rollback", reasons=("rollout interrupted",))
            raise
        finally:
            if self.traffic is not None:
                self.traffic.stop()

    def _run_phases(self) -> RolloutResult:
        self.phase = "running"
        phases: list[tuple[int, bool, int]] = []
        if self.policy.shadow_analyses:
            phases.append((0, True, self.policy.shadow_analyses))
        phases += [(w, False, self.policy.analyses_per_step) for w in self.policy.steps]
        for weight, mirror, needed in phases:
            self._set(weight, mirror)
            outcome = self._analyse_step(needed)
            if outcome == "promote":
                break
            if outcome is not None:
                return outcome
            if not mirror:
                self._decide("step", verdict="pass")
        self.backend.promote()
        self.phase = "promoted"
        self._decide("promote", reasons=("all steps passed analysis",))
        return self._result("promoted", "all steps passed analysis")

    def _analyse_step(self, needed: int) -> RolloutResult | str | None:
        """None when the step passed; "promote" on an operator's promote; else the end."""
        passes = inconclusive = 0
        window_start = time.time()
        while passes < needed:
            deadline = time.monotonic() + self.policy.interval_s
            while time.monotonic() < deadline:
                command = self._command()
                if command == "abort":
                    return self._end("aborted", "aborted by operator")
                if command == "promote":
                    if self.weight != 100:
                        self._set(100, False)
                    return "promote"
                time.sleep(min(self.TICK_S, max(0.0, deadline - time.monotonic())))
            metrics = self.backend.metrics(window_start)
            result = analyse(metrics, self.policy)
            if result.verdict == "fail":
                self.failures += 1
            self._decide(
                "analysis", verdict=result.verdict, reasons=result.reasons, metrics=metrics.to_dict()
            )
            if result.verdict != "inconclusive":
                # An inconclusive window is extended instead: its traffic counts towards
                # the next analysis, so a slow trickle still adds up to a judgement.
                window_start = time.time()
            if result.verdict == "pass":
                passes, inconclusive = passes + 1, 0
            elif result.verdict == "fail":
                inconclusive = 0
                if self.failures >= self.policy.failure_limit:
                    return self._end(
                        "rolled_back",
                        f"{self.failures} failed analyses (limit {self.policy.failure_limit}): "
                        + "; ".join(result.reasons),
                    )
            else:
                inconclusive += 1
                if inconclusive >= self.policy.max_inconclusive:
                    return self._end(
                        "rolled_back",
                        f"{inconclusive} windows in a row without enough canary traffic "
                        "to judge it",
                    )
        return None

    def _end(self, outcome: Literal["rolled_back", "aborted"], reason: str) -> RolloutResult:
        self.backend.rollback()
        self.weight, self.mirror = 0, False
        self.phase = outcome
        self._decide("abort" if outcome == "aborted" else "rollback", reasons=(reason,))
        return self._result(outcome, reason)

    def _result(self, outcome: Any, reason: str) -> RolloutResult:
        return RolloutResult(self.rollout_id, outcome, reason, self.max_weight, self.decisions)

