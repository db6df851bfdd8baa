"""Shared fixtures: free ports, an isolated kubeml home with its own kubeml.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubeml._proc import free_port

__all__ = ["free_port", "write_config"]


@pytest.fixture
def port() -> int:
    return free_port()


def approver_keys(directory: Path) -> tuple[str, str]:
    """An Ed25519 approver key pair written into ``directory``: ``(file:private, file:public)``,
    as ``signing.private_key`` and ``signing.public_key`` take them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = directory / "approver.pem", directory / "approver.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return f"file:{private}", f"file:{public}"


def write_config(directory: Path, dev: dict | None = None, **envs: dict) -> Path:
    """Write a kubeml.yaml into ``directory`` with the given environment blocks."""
    body = {"project": "test", "environments": {"dev": dev or {}, **envs}}
    path = directory / "kubeml.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory as the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KUBEML_ENV", raising=False)
    return tmp_path
