"""Fixtures shared by the unit tests.

``scanner``: the kube-score binary of the policy tests, built by ``make policy-assets`` (which
``make test`` runs first); skipped only where it was not built, e.g. a bare ``pytest`` on a new
machine.
"""

from __future__ import annotations

import pytest

from kubeml.errors import AssetsMissing
from kubeml.testing.policy import find_scanner


@pytest.fixture(scope="module")
def scanner():
    try:
        return find_scanner()
    except AssetsMissing as exc:
        pytest.skip(str(exc))
