"""Errors of the local control plane: declared in :mod:`kubeml.errors`, named here too."""

from __future__ import annotations

from kubeml.errors import AssetsMissing, ClusterAlreadyRunning, ClusterError, ComponentFailed, PortInUse

__all__ = [
    "AssetsMissing",
    "ClusterAlreadyRunning",
    "ClusterError",
    "ComponentFailed",
    "PortInUse",
]
