"""Serving's layering: the model classes know no web framework, the server no router."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVING = Path(__file__).resolve().parents[3] / "serving"
WEB_FRAMEWORKS = {"fastapi", "starlette", "grpc", "grpc_interceptor", "aiohttp", "uvicorn"}


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", ["model.py", "onnx_model.py", "batching.py", "repository.py"])
def test_model_classes_import_no_web_or_grpc_framework(module):
    frameworks = {n for n in _imported(SERVING / module) if n.split(".")[0] in WEB_FRAMEWORKS}
    assert not frameworks, f"{module} imports {sorted(frameworks)}"


def test_model_server_does_not_import_the_rollout_router():
    for path in sorted((SERVING / "server").glob("*.py")):
        rollout = {n for n in _imported(path) if n.startswith("kubeml.serving.rollout")}
        assert not rollout, f"server/{path.name} imports {sorted(rollout)}"


def test_importing_the_server_package_loads_neither_kserve_nor_torch():
    code = (
        "import sys, kubeml.serving.server, kubeml.serving.telemetry, kubeml.serving.deploy; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'kserve', 'torch', 'fastapi', 'grpc', 'aiohttp', 'uvicorn'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
