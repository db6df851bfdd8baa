"""Fixtures for serving tests: a real bundle of an untrained digits CNN."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kubeml.serving import ServingManager
from kubeml.testing.serving import DIGITS_CLASSES, write_digits_bundle

__all__ = ["CLASSES", "write_digits_bundle"]

CLASSES = DIGITS_CLASSES


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
