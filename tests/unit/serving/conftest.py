"""Fixtures for serving tests: a real bundle of an untrained digits CNN."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kubeml.bundle import BundleSpec, save_bundle
from kubeml.serving import ServingManager
from kubeml.models import build_model

CLASSES = tuple(str(i) for i in range(10))


def write_digits_bundle(directory: Path, *, seed: int = 0, **spec_overrides) -> Path:
    torch.manual_seed(seed)
    model = build_model("digits_cnn", **spec_overrides.pop("arch_kwargs_for_weights", {}))
    spec = BundleSpec(
        arch="digits_cnn",
        input_shape=(64,),
        classes=CLASSES,
        input_min=0.0,
        input_max=16.0,
        metadata={"purpose": "serving tests"},
        **spec_overrides,
    )
    save_bundle(directory, model, spec)
    return directory


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_bundle(tmp_path_factory.mktemp("bundle") / "digits")


@pytest.fixture(scope="session")
def digits_rows() -> np.ndarray:
    """Five digits-like rows: integer pixel counts 0..16, as in the scikit-learn set."""
    return np.random.default_rng(7).integers(0, 17, size=(5, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingManager]:
    """One process manager per test module; every server it started is stopped at the end."""
    manager = ServingManager(tmp_path_factory.mktemp("state"))
    try:
        yield manager
    finally:
        manager.stop()
