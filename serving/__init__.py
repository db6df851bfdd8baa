"""Model serving: KServe model servers for kubeml bundles, managed locally.

Importing this package is cheap: the model classes (:class:`BundleModel`,
:class:`OnnxBundleModel`, :class:`BundleRepository`, which pull in kserve and torch), the
rollout entry point and the telemetry hooks load on first access.

Layers, from the bottom: the model classes (``model``, ``onnx_model``, ``batching``,
``repository``; no web framework), ``protocol`` (wire conventions shared by server and
router), ``telemetry``, the model server process (``server``), its local manager
(``manager``), the rollout engine and router (``rollout``), the deploy-target seam
(``deploy``) and the clients (``client``).

Deploy and smoke-test a bundle::

    from kubeml.serving import ServingManager, smoke_test

    served = ServingManager(state_dir).deploy("digits", bundle_dir, version="3")
    report = smoke_test(served.url, served.name, x_test[:32], expected=y_test[:32])
    ServingManager(state_dir).stop("digits")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kubeml.serving.client import (
    ModelClient,
    Prediction,
    ServingRequestError,
    SmokeReport,
    smoke_test,
)
from kubeml.serving.deploy import (
    DeployTarget,
    KServeDeployTarget,
    LocalDeployTarget,
    get_deploy_target,
)
from kubeml.serving.manager import ServedModel, ServingManager, default_state_dir

if TYPE_CHECKING:
    from kubeml.serving.model import BundleModel, InputSignature
    from kubeml.serving.onnx_model import OnnxBundleModel
    from kubeml.serving.repository import BundleRepository
    from kubeml.serving.rollout.local import DeployOutcome, deploy_local
    from kubeml.serving.telemetry import FaultInjection

__all__ = [
    "BundleModel",
    "BundleRepository",
    "DeployOutcome",
    "DeployTarget",
    "FaultInjection",
    "InputSignature",
    "KServeDeployTarget",
    "LocalDeployTarget",
    "ModelClient",
    "OnnxBundleModel",
    "Prediction",
    "ServedModel",
    "ServingManager",
    "ServingRequestError",
    "SmokeReport",
    "default_state_dir",
    "deploy_local",
    "get_deploy_target",
    "smoke_test",
]

# name -> module that defines it, imported on first access (kserve, torch, the rollout
# engine and prometheus_client stay unloaded for callers that only manage servers).
_LAZY = {
    "BundleModel": "kubeml.serving.model",
    "BundleRepository": "kubeml.serving.repository",
    "DeployOutcome": "kubeml.serving.rollout.local",
    "FaultInjection": "kubeml.serving.telemetry",
    "InputSignature": "kubeml.serving.model",
    "OnnxBundleModel": "kubeml.serving.onnx_model",
    "deploy_local": "kubeml.serving.rollout.local",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
