"""What every ``kubeml`` command shares: options, consoles, exit codes, the state directory.

The CLI is the top layer: each command group is one module of this package and imports the
layers below it lazily, inside the command, so ``kubeml --help`` and ``kubeml serve status``
stay fast (no torch, Ray or kserve import).

- One console for results (stdout: tables, JSON, YAML a script reads) and one for
  diagnostics (stderr: errors, progress), so ``kubeml models list -o json | jq`` works.
- One error -> exit-code map (:func:`exit_code`): every command fails the same way.
- One state-directory resolver (:func:`serving_state_dir`).
- ``-o table|json|yaml`` for every list and status command (:func:`emit`). Tables never
  truncate a value: in a pipe they are as wide as their widest row, in a terminal long
  values wrap onto more lines instead of ending in an ellipsis.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kubeml.config import ENVIRONMENTS, EnvironmentConfig, load_config
from kubeml.errors import ConfigError, KubemlError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_GATE",
    "EXIT_OK",
    "EXIT_ROLLED_BACK",
    "ConfigOpt",
    "EnvOpt",
    "Output",
    "OutputOpt",
    "StateDirOpt",
    "console",
    "emit",
    "err_console",
    "exit_code",
    "fail",
    "failures_exit",
    "load_env",
    "print_table",
    "serving_state_dir",
]

#: Exit codes, the same for every command (the README lists them).
EXIT_OK = 0
EXIT_FAILED = 1
"""A stage or command failed; the error (and a log path where there is one) is printed."""
EXIT_CONFIG = 2
"""Invalid configuration or usage; the message names the key or flag and what is allowed."""
EXIT_GATE = 3
"""The model did not pass the promotion gate: a clean outcome, nothing registered or deployed."""
EXIT_ROLLED_BACK = 4
"""The new version's canary was rolled back (or aborted); the version before it keeps serving."""

#: Results: what a script reads. ``soft_wrap`` keeps long lines (paths, URLs) whole.
console = Console(soft_wrap=True)
#: Diagnostics: errors, warnings, progress.
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="kubeml.yaml to use (default: ./kubeml.yaml, else built-in defaults)."),
]
EnvOpt = Annotated[
    str | None,
    typer.Option("--env", "-e", help=f"Environment: {', '.join(ENVIRONMENTS)} (default: $KUBEML_ENV or dev)."),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Serving state directory (default: $KUBEML_HOME/serving if set, else <home>/serving of "
        "the environment).",
        show_default=False,
    ),
]


class Output(str, Enum):
    """How a list or status command prints its result."""

    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="Result format: table (for people), json or yaml (for scripts).")
]


def exit_code(exc: BaseException) -> int:
    """The exit code for an error: 2 for configuration and usage mistakes, else 1."""
    return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILED


def fail(error: BaseException | str, code: int | None = None) -> typer.Exit:
    """Print ``error`` on the diagnostics console; return the ``typer.Exit`` to raise.

    ``code`` defaults to :func:`exit_code` of the error (1 for a plain message).
    """
    err_console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
    if code is None:
        code = exit_code(error) if isinstance(error, BaseException) else EXIT_FAILED
    return typer.Exit(code)


@contextlib.contextmanager
def failures_exit(*also: type[BaseException]) -> Iterator[None]:
    """Turn a :class:`KubemlError` (and the ``also`` types) raised in the block into a clean exit.

    The one copy of the CLI's error handling: the message goes to stderr, the code follows
    :func:`exit_code`. Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except (KubemlError, *also) as exc:
        raise fail(exc) from None


def load_env(config: Path | None, env: str | None) -> EnvironmentConfig:
    """The environment's validated configuration, or exit 2 naming the bad key."""
    try:
        return load_config(config, env)
    except ConfigError as exc:
        raise fail(exc) from None


def serving_state_dir(state_dir: Path | None, config: Path | None = None, env: str | None = None) -> Path:
    """Where local servers, routers and rollouts keep their state: the one resolver.

    ``--state-dir`` if given; else ``$KUBEML_HOME/serving`` when ``KUBEML_HOME`` is set;
    else ``<home>/serving`` of the environment (``home`` in kubeml.yaml, default ``.kubeml``).
    Resolved per call, never at import: the environment and working directory may change.
    """
    if state_dir is not None:
        return state_dir
    home = os.environ.get("KUBEML_HOME")
    if home:
        return Path(home) / "serving"
    return Path(load_env(config, env).home) / "serving"


def _plain(value: Any) -> Any:
    """JSON-able form of a result value (dataclasses, paths, enums, tuples)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def print_table(table: Table) -> None:
    """Print ``table`` on the results console without truncating any cell.

    In a terminal every column folds (a long URL continues on the next line); in a pipe or
    file the table is printed as wide as its widest row, so each value stays on one line
    and can be grepped or copied.
    """
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = False
    if console.is_terminal:
        console.print(table)
        return
    wide = Console(width=10_000, soft_wrap=True, file=console.file, color_system=None)
    needed = wide.measure(table).maximum
    Console(width=max(needed, 20), soft_wrap=True, file=console.file, color_system=None).print(table)


def emit(
    output: Output,
    data: Any,
    *,
    columns: Sequence[str] = (),
    rows: Sequence[Sequence[Any]] = (),
    title: str | None = None,
    empty: str | None = None,
) -> None:
    """Print a list/status result: ``data`` as JSON or YAML, or ``rows`` as a table.

    ``data`` is the machine-readable result (lists of dicts, dataclasses); the table is
    what a person reads. ``empty`` is printed instead of an empty table.
    """
    if output is Output.json:
        console.file.write(json.dumps(_plain(data), indent=2, sort_keys=True, default=str) + "\n")
        return
    if output is Output.yaml:
        import yaml

        console.file.write(yaml.safe_dump(_plain(data), sort_keys=True, default_flow_style=False))
        return
    if not rows and empty is not None:
        console.print(empty, highlight=False)
        return
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    print_table(table)
