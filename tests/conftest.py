"""Shared fixtures: free ports, an isolated kubeml home with its own kubeml.yaml."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


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
