import numpy as np
import torch

from kubeml.config import GateConfig
from kubeml.evaluation import evaluate_model, gate


class Fixed(torch.nn.Module):
    """Predicts the class given in feature 0: a model whose answers we know."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()


def test_metrics_and_confusion_matrix_on_known_predictions():
    x = np.array([[0], [1], [2], [2], [1]], dtype=np.float32)
    y = np.array([0, 1, 2, 1, 1])
    r = evaluate_model(Fixed(), x, y, num_classes=3)
    assert r.accuracy == 0.8
    assert r.confusion_matrix == ((1, 0, 0), (0, 2, 1), (0, 0, 1))
    assert r.predictions == (0, 1, 2, 2, 1)
    # per-class F1: 1.0, 0.8, 0.6667 -> macro 0.8222
    assert abs(r.macro_f1 - (1.0 + 0.8 + 2 / 3) / 3) < 1e-9


def test_gate_passes_at_threshold_and_names_each_miss():
    cfg = GateConfig(min_accuracy=0.9, min_macro_f1=0.9)
    assert gate({"accuracy": 0.9, "macro_f1": 0.95}, cfg).passed
    d = gate({"accuracy": 0.85, "macro_f1": 0.80}, cfg)
    assert not d.passed
    assert d.reasons == ("accuracy 0.8500 < min_accuracy 0.9000", "macro_f1 0.8000 < min_macro_f1 0.9000")


def test_gate_fails_on_missing_or_nan_metric():
    d = gate({"accuracy": float("nan")}, GateConfig())
    assert not d.passed and "accuracy missing" in d.reasons[0] and "macro_f1 missing" in d.reasons[1]
