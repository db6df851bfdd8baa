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

__all__ = ["DigitsCNN", "SmallResNet", "TabularMLP", "available_models", "build_model"]


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


class TabularMLP(nn.Module):
    """A multi-layer perceptron for flat feature rows.

    Features are standardised inside ``forward`` with a fixed affine map (``feature_scale``,
    ``feature_offset``: the model's own input contract, kept in its arguments so a bundle
    reproduces it). The defaults fit digits pixels (0..16).
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: tuple[int, ...] | list[int] = (128, 64),
        dropout: float = 0.1,
        feature_scale: float = 16.0,
        feature_offset: float = 0.0,
    ):
        super().__init__()
        if in_features < 1 or not hidden or min(hidden) < 1:
            raise ConfigError(f"TabularMLP needs in_features >= 1 and hidden sizes >= 1, got {in_features}, {hidden}")
        if feature_scale == 0:
            raise ConfigError("TabularMLP feature_scale must be non-zero")
        self.feature_scale = float(feature_scale)
        self.feature_offset = float(feature_offset)
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.net((x - self.feature_offset) / self.feature_scale)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for small images: a stem, ``len(widths)`` stages of ``blocks`` basic blocks.

    Every stage after the first halves the resolution. With the defaults (widths 16/32/64,
    one block each: ~0.2M parameters) it takes 8x8 digits; ``in_channels=3, image_size=32``
    gives a CIFAR-sized network. Pixel values are divided by ``pixel_max`` inside ``forward``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        widths: tuple[int, ...] | list[int] = (16, 32, 64),
        blocks: int = 1,
        pixel_max: float = 16.0,
    ):
        super().__init__()
        if not widths or min(widths) < 1 or blocks < 1 or image_size < 1:
            raise ConfigError(f"SmallResNet needs widths >= 1, blocks >= 1, image_size >= 1; got {widths}, {blocks}, {image_size}")
        self.in_channels, self.image_size, self.pixel_max = in_channels, image_size, float(pixel_max)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                stages.append(_BasicBlock(c, w, stride=2 if (i > 0 and b == 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat rows
            x = x.view(-1, self.in_channels, self.image_size, self.image_size)
        elif x.dim() == 3:  # (N, H, W), one channel
            x = x.unsqueeze(1)
        return self.head(self.stages(self.stem(x / self.pixel_max)))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "mlp": TabularMLP,
    "resnet": SmallResNet,
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
