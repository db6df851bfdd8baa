"""kubeml: a Kubernetes-native ML platform (KFP pipelines, Ray Train, KServe, MLflow).

The core package: configuration, errors, the artifact store, datasets, model bundles and
architectures, the registry and the run ledger. The capabilities sit on top of it
(:mod:`kubeml.training`, :mod:`kubeml.serving`, :mod:`kubeml.operators`), the pipeline and
its stages above them (:mod:`kubeml.pipelines`), and the ``kubeml`` CLI on top
(:mod:`kubeml.cli`); ``.importlinter`` states and checks the layering.

Names are loaded on first use, so ``import kubeml`` costs neither torch nor MLflow:

>>> import kubeml
>>> kubeml.EnvironmentConfig().training.target
'local'
>>> issubclass(kubeml.ConfigError, kubeml.KubemlError)
True
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the core module that defines it.
_EXPORTS: dict[str, str] = {
    "ArtifactStore": "kubeml.artifacts",
    "BundleSpec": "kubeml.bundle",
    "EnvironmentConfig": "kubeml.config",
    "KubemlConfig": "kubeml.config",
    "Ledger": "kubeml.ledger",
    "ModelVersionInfo": "kubeml.registry",
    "Registry": "kubeml.registry",
    "available_models": "kubeml.models",
    "build_model": "kubeml.models",
    "evaluate_model": "kubeml.evaluation",
    "ingest": "kubeml.data",
    "is_retryable": "kubeml.errors",
    "load_bundle": "kubeml.bundle",
    "load_config": "kubeml.config",
    "load_dataset": "kubeml.data",
    "open_store": "kubeml.artifacts",
    "save_bundle": "kubeml.bundle",
}
# The whole error tree is public.
_ERRORS = (
    "ApprovalError", "ArtifactError", "ArtifactNotFound", "AssetsMissing", "BundleError", "CheckpointCorrupt",
    "ClusterAlreadyRunning", "ClusterError", "ComponentFailed", "ConfigError", "DataValidationError",
    "JobApiError", "JobCancelled", "JobConflict", "JobError", "JobFailed", "JobStalled", "JobTimedOut", "KfpAuthError",
    "KfpUnreachable", "KubemlError", "PipelineCompileError", "PipelineError", "PortInUse",
    "RegistryError", "ServingError", "ServingRequestError", "StageFailed", "TrainingFailed",
)
_EXPORTS.update({name: "kubeml.errors" for name in _ERRORS})

__all__ = [
    "ApprovalError",
    "ArtifactError",
    "ArtifactNotFound",
    "ArtifactStore",
    "AssetsMissing",
    "BundleError",
    "BundleSpec",
    "CheckpointCorrupt",
    "ClusterAlreadyRunning",
    "ClusterError",
    "ComponentFailed",
    "ConfigError",
    "DataValidationError",
    "EnvironmentConfig",
    "JobApiError",
    "JobCancelled",
    "JobConflict",
    "JobError",
    "JobFailed",
    "JobStalled",
    "JobTimedOut",
    "KfpAuthError",
    "KfpUnreachable",
    "KubemlConfig",
    "KubemlError",
    "Ledger",
    "ModelVersionInfo",
    "PipelineCompileError",
    "PipelineError",
    "PortInUse",
    "Registry",
    "RegistryError",
    "ServingError",
    "ServingRequestError",
    "StageFailed",
    "TrainingFailed",
    "available_models",
    "build_model",
    "evaluate_model",
    "ingest",
    "is_retryable",
    "load_bundle",
    "load_config",
    "load_dataset",
    "open_store",
    "save_bundle",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kubeml' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
