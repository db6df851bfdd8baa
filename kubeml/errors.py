"""The kubeml exception tree.

    KubemlError
    ├── ConfigError             bad kubeml.yaml / bad argument; says which key and what is allowed
    ├── ArtifactError           artifact store problems
    │   └── ArtifactNotFound
    ├── DataValidationError     dataset violates its constraints; lists every failing constraint
    ├── GateFailed              model below the promotion thresholds (a clean stop, not a crash)
    ├── BundleError             a model bundle is missing, truncated or inconsistent
    ├── RegistryError           model registry (MLflow) problems
    └── ServingError            model server lifecycle problems

Every error pickles (it crosses Ray and KFP process boundaries), so subclasses keep their
constructor arguments in ``self.args``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ArtifactNotFound",
    "BundleError",
    "ConfigError",
    "DataValidationError",
    "GateFailed",
    "KubemlError",
    "RegistryError",
    "ServingError",
]


class KubemlError(Exception):
    """Base of every error kubeml raises on purpose."""


class ConfigError(KubemlError):
    """Configuration or argument is invalid; the message names the key and the fix."""


class ArtifactError(KubemlError):
    """The artifact store could not complete an operation."""


class ArtifactNotFound(ArtifactError):
    """No artifact exists at the given key."""


class DataValidationError(KubemlError):
    """A dataset violates one or more constraints.

    ``failures`` is a tuple of human-readable strings, one per failing constraint.
    """

    def __init__(self, failures: list[str] | tuple[str, ...]):
        self.failures = tuple(failures)
        super().__init__(self.failures)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {f}" for f in self.failures)
        return f"data validation failed ({len(self.failures)} constraint(s)):\n{lines}"


class GateFailed(KubemlError):
    """The evaluated model did not meet the promotion thresholds."""


class BundleError(KubemlError):
    """A model bundle could not be written or read."""


class RegistryError(KubemlError):
    """The model registry rejected or could not complete an operation."""


class ServingError(KubemlError):
    """A model server could not be started, reached or stopped."""
