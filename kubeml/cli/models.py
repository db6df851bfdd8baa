"""``kubeml models list|approve|reject``: the registry's versions and their approval."""

from __future__ import annotations

import typer

from kubeml.cli._common import ConfigOpt, EnvOpt, Output, OutputOpt, console, emit, failures_exit, load_env

__all__ = ["app"]

app = typer.Typer(help="Model registry: list versions, approve or reject them.", no_args_is_help=True)


def _registry(cfg):
    from kubeml.registry import Registry

    return Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)


@app.command("list")
def models_list(config: ConfigOpt = None, env: EnvOpt = None, output: OutputOpt = Output.table) -> None:
    """List the registered versions of the environment's model."""
    cfg = load_env(config, env)
    with failures_exit():
        versions = _registry(cfg).versions(cfg.registry.model_name)
    data = [
        {"name": v.name, "version": v.version, "approval_status": v.approval_status,
         "accuracy": v.tags.get("metric.accuracy", ""), "macro_f1": v.tags.get("metric.macro_f1", ""),
         "dataset_version": v.tags.get("dataset_version", ""), "code_version": v.tags.get("code_version", ""),
         "source": v.source}
        for v in versions
    ]
    rows = [(d["version"], d["approval_status"], d["accuracy"], d["macro_f1"], d["dataset_version"],
             d["code_version"], d["source"]) for d in data]
    emit(output, data, columns=("version", "approval", "accuracy", "macro-F1", "dataset", "code", "source"),
         rows=rows, title=cfg.registry.model_name)


def _set_approval(config, env, version: int, status: str) -> None:
    from kubeml.approvals import load_private_key, sign_approval
    from kubeml.errors import ApprovalError
    from kubeml.registry import BUNDLE_DIGEST_TAG, current_user

    cfg = load_env(config, env)
    with failures_exit():
        registry = _registry(cfg)
        signature, who = None, current_user()
        if status == "approved" and cfg.signing.private_key:
            digest = registry.get(cfg.registry.model_name, version).tags.get(BUNDLE_DIGEST_TAG)
            if not digest:
                raise ApprovalError(f"{cfg.registry.model_name} version {version} has no registered bundle "
                                    "digest: there is nothing to sign")
            signature = sign_approval(load_private_key(cfg.signing.private_key), model=cfg.registry.model_name,
                                      version=version, digest=digest, approver=who)
        elif status == "approved" and cfg.signing.public_key:
            raise ApprovalError("this environment verifies signed approvals (signing.public_key) but has no "
                                "signing.private_key to sign with; an unsigned approval would never deploy")
        mv = registry.set_approval(cfg.registry.model_name, version, status, by=who, signature=signature,
                                   distinct_approver=cfg.approval == "manual")
    console.print(f"{mv.name} version {mv.version}: {mv.approval_status}" + (" (signed)" if signature else ""))


@app.command("approve")
def models_approve(version: int, config: ConfigOpt = None, env: EnvOpt = None) -> None:
    """Approve a registered version for deployment."""
    _set_approval(config, env, version, "approved")


@app.command("reject")
def models_reject(version: int, config: ConfigOpt = None, env: EnvOpt = None) -> None:
    """Reject a registered version; it can no longer be deployed."""
    _set_approval(config, env, version, "rejected")
