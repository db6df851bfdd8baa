"""The layering contracts of .importlinter hold, and the check fails on a violation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeml.testing.layers import lint_imports

REPO = Path(__file__).resolve().parents[2]


def test_every_core_module_is_in_the_core_layer():
    """A new module in kubeml/ must be placed in a layer, or the layering would not see it."""
    text = (REPO / ".importlinter").read_text()
    core = next(line for line in text.splitlines() if line.strip().startswith("kubeml.config :"))
    listed = {name.strip() for name in core.split(":")}
    modules = {f"kubeml.{p.stem}" for p in (REPO / "kubeml").glob("*.py") if p.stem != "__init__"}
    assert modules - listed == set(), "add these to the core layer of .importlinter"


def test_every_layering_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("path", "text", "contract"),
    [
        ("kubeml/config.py", "import kubeml.serving.manager\n", "Layers"),
        ("kubeml/training/_violation.py", "import kubeml.serving.client\n", "do not import each other"),
        ("kubeml/serving/_violation.py", "import pytest\n", "Only the harness imports pytest"),
        ("kubeml/serving/_violation.py", "import kubernetes.client\n", "kubernetes client"),
    ],
    ids=["core-imports-serving", "training-imports-serving", "serving-imports-pytest", "stray-kubernetes"],
)
def test_a_deliberate_violation_breaks_its_contract(path, text, contract):
    result = lint_imports(REPO, extra_files={path: text})
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if "BROKEN" in line]
    assert any(contract in line for line in broken), result.stdout
