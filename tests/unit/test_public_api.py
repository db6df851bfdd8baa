"""The curated public API: each package's ``__all__`` is sorted, complete and importable;
docstring examples run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest


PACKAGES = ("kubeml", "kubeml.training", "kubeml.serving")


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_unique_and_every_name_resolves(name):
    package = importlib.import_module(name)
    exported = list(package.__all__)
    assert exported == sorted(exported), "keep __all__ sorted"
    assert len(exported) == len(set(exported))
    missing = [n for n in exported if getattr(package, n, None) is None]
    assert not missing, f"{name}.__all__ names that do not resolve: {missing}"


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_complete(name):
    """Every public name the package defines or re-exports is in ``__all__`` (submodules aside)."""
    package = importlib.import_module(name)
    lazy = set(getattr(package, "_EXPORTS", {}))
    defined = {  # classes and functions of kubeml's own (typing helpers and submodules aside)
        n for n, v in vars(package).items()
        if not n.startswith("_") and str(getattr(v, "__module__", "")).startswith("kubeml")
    }
    assert (defined | lazy) - set(package.__all__) == set()


def test_the_error_tree_is_public_from_the_top():
    import kubeml.errors

    assert set(kubeml.errors.__all__) <= set(kubeml.__all__)


def _modules():
    for root in ("kubeml",):
        package = importlib.import_module(root)
        yield root
        for info in pkgutil.walk_packages(package.__path__, root + "."):
            if info.name.endswith("__main__"):
                continue  # runs a program on import
            yield info.name


def test_docstring_examples_run():
    """Every ``>>>`` example in the package runs (``# doctest: +SKIP`` marks the ones that need a cluster)."""
    failures, tried = [], 0
    for name in _modules():
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                                 report=False)
        tried += result.attempted
        if result.failed:
            failures.append(f"{name}: {result.failed} of {result.attempted} failed")
    assert not failures, failures
    assert tried >= 5  # the examples exist: a walk that found no module would pass vacuously
