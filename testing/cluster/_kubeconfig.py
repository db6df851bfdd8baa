"""Kubeconfig files for the local control plane (credentials embedded, one user each)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml

__all__ = ["write_kubeconfig"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_kubeconfig(
    path: Path,
    *,
    cluster_name: str,
    server: str,
    ca_pem: bytes,
    user: str,
    cert_pem: bytes,
    key_pem: bytes,
) -> Path:
    """Write a kubeconfig whose only context is ``user`` on ``cluster_name``.

    The file holds a private key, so it is created 0600; it is written to a temp name and
    renamed, so a reader never sees half a file.
    """
    context = f"{user}@{cluster_name}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(cert_pem),
                    "client-key-data": _b64(key_pem),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": cluster_name, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    tmp.replace(path)
    return path
