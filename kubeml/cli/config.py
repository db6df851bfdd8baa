"""``kubeml config show|validate``: the resolved environment, and a check of every environment."""

from __future__ import annotations

import typer

from kubeml.cli._common import ConfigOpt, EnvOpt, Output, OutputOpt, console, emit, load_env

__all__ = ["app"]

app = typer.Typer(help="Inspect and check kubeml.yaml.", no_args_is_help=True)


@app.command("show")
def config_show(config: ConfigOpt = None, env: EnvOpt = None, output: OutputOpt = Output.json) -> None:
    """Print the resolved configuration of one environment (JSON by default, or YAML)."""
    cfg = load_env(config, env)
    if output is Output.table:
        rows = _flatten(cfg.model_dump(mode="json"))
        emit(output, None, columns=("key", "value"), rows=rows, title=f"environment {cfg.name}")
        return
    emit(output, cfg.model_dump(mode="json"))


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, str(value)))
    return rows


@app.command("validate")
def config_validate(config: ConfigOpt = None) -> None:
    """Validate every environment in the config file."""
    load_env(config, "dev")  # loading validates every environment, not only the one asked for
    console.print("configuration is valid")
