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
