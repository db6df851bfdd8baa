"""Check the package's layering with import-linter, on the package as it is installed.

kubeml's subpackages live in top-level folders (``training/`` is ``kubeml.training``, through
``package-dir`` in pyproject.toml). grimp, which import-linter builds its graph with, walks
a package's directory, so it would see only ``kubeml/``. :func:`lint_imports` copies the
Python files into a temporary tree laid out as installed and runs the contracts of
``.importlinter`` there, in a subprocess whose ``PYTHONPATH`` puts that tree first.

    >>> result = lint_imports(Path("."))        # doctest: +SKIP
    >>> result.returncode, "Contracts: 6 kept, 0 broken." in result.stdout   # doctest: +SKIP
    (0, True)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

__all__ = ["installed_layout", "lint_imports"]


def installed_layout(repo: Path, dest: Path) -> Path:
    """Copy the ``.py`` files of ``repo`` into ``dest`` as the installed ``kubeml`` package; returns ``dest``."""
    setup = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setup["package-dir"]
    for package in setup["packages"]:
        # The deepest mapped parent decides where the package's folder is.
        parent = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        folder = repo / mapping[parent] / Path(*package[len(parent):].strip(".").split(".")) \
            if package != parent else repo / mapping[parent]
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in folder.glob("*.py"):
            shutil.copy2(source, target / source.name)
    return dest


def lint_imports(repo: Path, *, extra_files: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` with ``repo``'s ``.importlinter`` on the installed layout.

    ``extra_files`` (a path under the tree, e.g. ``kubeml/config.py``, -> text) are appended
    to the tree's copy of that file (or written, for a new file) first: a test adds a
    violation this way to see the check fail.
    """
    repo = Path(repo).resolve()
    with tempfile.TemporaryDirectory(prefix="kubeml-layers-") as tmp:
        tree = installed_layout(repo, Path(tmp) / "src")
        for name, text in (extra_files or {}).items():
            path = tree / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write("\n" + text)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.run(
            [str(lint), str(repo / ".importlinter"), "--no-cache"],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
        )


if __name__ == "__main__":  # `python -m kubeml.testing.layers` (make layers)
    done = lint_imports(Path.cwd())
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    raise SystemExit(done.returncode)
