"""Model architectures, pluggable by name.

Models take raw feature values and normalise inside ``forward`` so that a served model
needs no separate preprocessing step: what the pipeline evaluates is exactly what the
endpoint answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kubeml.errors import ConfigError

__all__ = ["DigitsCNN", "available_models", "build_model"]


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 greyscale digits (values 0..16), 10 classes.

    About 30k parameters: big enough for >= 0.97 test accuracy on the scikit-learn digits,
    small enough that an epoch on two CPU workers takes well under a second.
    """

    #: Digits pixels are counts 0..16; dividing keeps activations near unit scale.
    PIXEL_MAX = 16.0

    def __init__(self, num_classes: int = 10, channels: int = 32, dropout: float = 0.1):
        super().__init__()
        if channels < 1:
            raise ConfigError(f"DigitsCNN channels must be >= 1, got {channels}")
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (N, 64) flat rows, as in the CSV/tabular form
            x = x.view(-1, 1, 8, 8)
        elif x.dim() == 3:  # (N, 8, 8)
            x = x.unsqueeze(1)
        return self.head(self.features(x / self.PIXEL_MAX))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registered name.

    >>> build_model("digits_cnn", channels=8)(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        ) from None
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for model {name!r}: {exc}") from exc
