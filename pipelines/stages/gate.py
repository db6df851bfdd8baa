"""gate: compare the evaluation with the environment's thresholds."""

from __future__ import annotations

from kubeml.pipelines.stages._common import open_stage, run_stage

__all__ = ["gate_stage"]


def gate_stage(config_json: str, run_id: str, accuracy: float, macro_f1: float) -> str:
    """Returns ``"passed"`` or ``"failed"``; a failure is a clean outcome, recorded with its reasons."""
    from kubeml.evaluation import gate

    ctx = open_stage(config_json, run_id)
    cfg = ctx.cfg

    def body(rec, _attempt):
        decision = gate({"accuracy": accuracy, "macro_f1": macro_f1}, cfg.gate)
        rec.outputs = {"passed": decision.passed, "reasons": list(decision.reasons),
                       "min_accuracy": cfg.gate.min_accuracy, "min_macro_f1": cfg.gate.min_macro_f1}
        rec.message = "passed" if decision.passed else "failed: " + decision.summary()
        return "passed" if decision.passed else "failed"

    return run_stage("gate", ctx, body)
