"""Errors raised by the local control plane (``kubeml.cluster``).

    KubemlError
    └── ClusterError              the control plane could not be started, reached or stopped
        ├── AssetsMissing         binaries/CRDs not built; says which command builds them
        ├── PortInUse             a requested port is taken; says how to pick another
        ├── ClusterAlreadyRunning a live cluster owns the state directory
        └── ComponentFailed       a component exited or never became healthy; carries its log tail

Every error keeps its constructor arguments in ``self.args`` so it pickles.
"""

from __future__ import annotations

from kubeml.errors import KubemlError

__all__ = [
    "AssetsMissing",
    "ClusterAlreadyRunning",
    "ClusterError",
    "ComponentFailed",
    "PortInUse",
]


class ClusterError(KubemlError):
    """The local control plane could not be started, reached or stopped."""


class AssetsMissing(ClusterError):
    """The control-plane binaries or generated CRDs are not where the launcher looks."""


class PortInUse(ClusterError):
    """A port the cluster was asked to listen on is already taken."""

    def __init__(self, port: int, component: str):
        self.port = port
        self.component = component
        super().__init__(port, component)

    def __str__(self) -> str:
        return (
            f"port {self.port} (for {self.component}) is already in use on 127.0.0.1; "
            f"stop whatever listens there (`ss -ltnp 'sport = :{self.port}'` shows it), "
            f"or pass port 0 to pick a free one"
        )


class ClusterAlreadyRunning(ClusterError):
    """Another live cluster owns the state directory."""

    def __init__(self, name: str, server: str):
        self.name = name
        self.server = server
        super().__init__(name, server)

    def __str__(self) -> str:
        return (
            f"cluster {self.name!r} is already running at {self.server}; use it, "
            f"or stop it first with `kubeml cluster down --name {self.name}`"
        )


class ComponentFailed(ClusterError):
    """A control-plane component exited early or did not become healthy in time."""

    def __init__(self, component: str, reason: str, log_tail: str = "", log_path: str = ""):
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
        self.log_path = log_path
        super().__init__(component, reason, log_tail, log_path)

    def __str__(self) -> str:
        text = f"{self.component}: {self.reason}"
        if self.log_path:
            text += f" (full log: {self.log_path})"
        if self.log_tail:
            text += "\n--- last lines of its log ---\n" + self.log_tail
        return text
