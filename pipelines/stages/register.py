"""register: the bundle becomes the next model version in the registry, with its provenance."""

from __future__ import annotations

import hashlib
import json

from kubeml.pipelines.stages._common import open_stage, run_stage

__all__ = ["register_stage"]


def register_stage(
    config_json: str, run_id: str, dataset: str, version: str, bundle_key: str, code_version: str
) -> int:
    """Registers the bundle as the next model version; returns the version number."""
    from kubeml.bundle import MANIFEST_FILE
    from kubeml.registry import AUTHOR_TAG, BUNDLE_DIGEST_TAG, Registry, current_user

    ctx = open_stage(config_json, run_id)
    cfg, store = ctx.cfg, ctx.store

    def body(rec, _attempt):
        evaluation = json.loads(store.get_text(f"runs/{run_id}/evaluation.json"))
        metrics = {k: evaluation[k] for k in ("accuracy", "macro_f1", "test_samples")}
        train = ctx.ledger.read("train").outputs
        # The manifest hashes every file of the bundle; its digest pins what is approved.
        digest = "sha256:" + hashlib.sha256(store.get_bytes(f"{bundle_key}/{MANIFEST_FILE}")).hexdigest()
        reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
        mv = reg.register(
            cfg.registry.model_name,
            store.url(bundle_key),
            metrics=metrics,
            params={"model": cfg.training.model, "epochs": cfg.training.epochs, "workers": cfg.training.workers,
                    "batch_size": cfg.training.batch_size, "learning_rate": cfg.training.learning_rate,
                    "seed": cfg.data.seed},
            tags={"dataset": dataset, "dataset_version": version, "code_version": code_version,
                  "kubeml.run_id": run_id, "environment": cfg.name,
                  "checkpoint_uri": train.get("checkpoint_uri", ""), BUNDLE_DIGEST_TAG: digest,
                  AUTHOR_TAG: current_user()},
            auto_approve=cfg.approval == "auto",
        )
        if mv.approved and cfg.signing.private_key:  # an auto environment signs its own approvals
            from kubeml.approvals import load_private_key, sign_approval

            approver = mv.tags.get("approved_by", "")
            signature = sign_approval(load_private_key(cfg.signing.private_key), model=mv.name,
                                      version=mv.version, digest=digest, approver=approver)
            mv = reg.set_approval(mv.name, mv.version, "approved", by=approver, signature=signature)
        rec.outputs = {"model_name": mv.name, "version": mv.version, "approval_status": mv.approval_status,
                       "source": mv.source, "bundle_digest": digest}
        rec.message = f"{mv.name} version {mv.version} ({mv.approval_status})"
        return mv.version

    return run_stage("register", ctx, body)
