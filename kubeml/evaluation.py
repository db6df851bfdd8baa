"""Offline evaluation and the promotion gate."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kubeml.config import GateConfig

__all__ = ["EvalReport", "GateDecision", "evaluate_model", "gate", "predict"]


@dataclass(frozen=True)
class EvalReport:
    accuracy: float
    macro_f1: float
    confusion_matrix: tuple[tuple[int, ...], ...]
    """Rows are true classes, columns predicted classes."""
    samples: int
    predictions: tuple[int, ...] = field(repr=False, default=())
    """Predicted class per held-out sample, in dataset order (the serving smoke test compares against these)."""

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "test_samples": float(self.samples)}


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    """Why it failed (empty when it passed), one line per missed threshold."""

    def summary(self) -> str:
        return "passed" if self.passed else "; ".join(self.reasons)


def predict(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class indices for ``x`` with ``model`` in eval mode, on the CPU."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            logits = model(torch.as_tensor(x[i : i + batch_size], dtype=torch.float32))
            out.append(logits.argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def evaluate_model(model, x: np.ndarray, y: np.ndarray, num_classes: int = 10) -> EvalReport:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    pred = predict(model, x)
    labels = list(range(num_classes))
    cm = confusion_matrix(y, pred, labels=labels)
    return EvalReport(
        accuracy=float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in cm),
        samples=int(len(y)),
        predictions=tuple(int(p) for p in pred),
    )


def gate(metrics: dict[str, float], cfg: GateConfig) -> GateDecision:
    """Compare metrics with the thresholds; every missed threshold is named with both values."""
    reasons = []
    for metric, threshold in (("accuracy", cfg.min_accuracy), ("macro_f1", cfg.min_macro_f1)):
        value = metrics.get(metric)
        if value is None or not np.isfinite(value):
            reasons.append(f"{metric} missing from evaluation")
        elif value < threshold:
            reasons.append(f"{metric} {value:.4f} < min_{metric} {threshold:.4f}")
    return GateDecision(passed=not reasons, reasons=tuple(reasons))
