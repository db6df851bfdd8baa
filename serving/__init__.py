"""Model serving: KServe model servers for kubeml bundles, managed locally.

Importing this package is cheap: :class:`BundleModel` (which pulls in kserve and torch)
loads on first access.

Deploy and smoke-test a bundle::

    from kubeml.serving import ServingManager, smoke_test

    served = ServingManager(state_dir).deploy("digits", bundle_dir, version="3")
    report = smoke_test(served.url, served.name, x_test[:32], expected=y_test[:32])
    ServingManager(state_dir).stop("digits")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubeml.serving.client import (
    ModelClient,
    Prediction,
    ServingRequestError,
    SmokeReport,
    smoke_test,
)
from kubeml.serving.manager import ServedModel, ServingManager, default_state_dir

if TYPE_CHECKING:
    from kubeml.serving.model import BundleModel, InputSignature

__all__ = [
    "BundleModel",
    "InputSignature",
    "ModelClient",
    "Prediction",
    "ServedModel",
    "ServingManager",
    "ServingRequestError",
    "SmokeReport",
    "default_state_dir",
    "smoke_test",
]

_LAZY = {"BundleModel", "InputSignature"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from kubeml.serving import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
