"""``kubeml``: the command line (the top layer of the package).

One module per command group, mounted here:

    run.py       kubeml run, kubeml pipeline compile
    models.py    kubeml models list|approve|reject
    config.py    kubeml config show|validate
    train.py     kubeml train, kubeml tune
    serve.py     kubeml serve status|stop|deploy
    rollout.py   kubeml deploy, kubeml rollout ..., kubeml predict-batch
    cluster.py   kubeml cluster up|down|status (the local control plane from the test harness)

Exit codes (:mod:`kubeml.cli._common`): 0 success; 1 a stage or command failed; 2 bad
configuration or usage; 3 the model did not pass the promotion gate (a clean outcome:
nothing was registered); 4 the new version was registered but its canary was rolled back
(the previous version serves).
"""

from __future__ import annotations

import typer

from kubeml.cli import cluster, config, models, rollout, run, serve, train
from kubeml.cli._common import EXIT_CONFIG, EXIT_FAILED, EXIT_GATE, EXIT_ROLLED_BACK, fail
from kubeml.errors import KubemlError

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_GATE", "EXIT_ROLLED_BACK", "app", "main"]

app = typer.Typer(
    help="kubeml: Kubernetes-native ML platform (KFP, Ray Train, KServe, MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
run.register(app)
train.register(app)
rollout.register(app)
app.add_typer(models.app, name="models")
app.add_typer(config.app, name="config")
app.add_typer(serve.app, name="serve", help="Local model servers: status, stop, deploy a bundle.")
app.add_typer(cluster.app, name="cluster", help="Local Kubernetes control plane for integration tests.")


def main() -> None:
    """Entry point of the ``kubeml`` script."""
    try:
        app()
    except KubemlError as exc:  # a command that let one through: same message and code as the rest
        raise SystemExit(fail(exc).exit_code) from None


if __name__ == "__main__":
    main()
