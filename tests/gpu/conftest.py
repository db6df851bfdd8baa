"""GPU tests run only where CUDA is: elsewhere they are deselected and the count is reported."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.stash[_NOTE] = len(gpu)


_NOTE = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    n = config.stash.get(_NOTE, 0)
    if n:
        terminalreporter.write_line(f"{n} gpu tests deselected: no CUDA device here (run them on a GPU machine)")
