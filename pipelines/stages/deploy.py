"""deploy: serve an approved version on the environment's deploy target and smoke-test it.

``serving.target`` picks the target through :func:`kubeml.serving.deploy.get_deploy_target`
(a seam, not an ``if``): ``local`` serves behind the rollout router on this machine; the
first version directly, a later one as an analysed canary against the one being served.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubeml.pipelines.stages._bundles import bundle_key_from_url, local_bundle
from kubeml.pipelines.stages._common import open_stage, run_stage

__all__ = ["deploy_stage"]


def deploy_stage(config_json: str, run_id: str, model_version: int) -> str:
    """Serves an approved version, smoke-tests it; returns the V2 infer URL.

    A pending version is not deployed: the stage records that it awaits approval and
    returns an empty string. So does a canary that was rolled back (the version before it
    keeps serving).
    """
    from kubeml.data import load_dataset
    from kubeml.registry import Registry, verified_bundle
    from kubeml.serving.client import smoke_test
    from kubeml.serving.tokens import first_token
    from kubeml.serving.deploy import get_deploy_target

    ctx = open_stage(config_json, run_id)
    cfg, store = ctx.cfg, ctx.store
    target = get_deploy_target(cfg.serving.target)

    def body(rec, _attempt):
        reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
        mv = reg.get(cfg.registry.model_name, model_version)
        if not mv.approved:
            rec.status = "skipped"
            rec.message = (
                f"version {mv.version} is {mv.approval_status}; not deployed "
                f"(approve it with: kubeml models approve {mv.version} --env {cfg.name})"
            )
            rec.outputs = {"deployed": False, "approval_status": mv.approval_status}
            return ""
        bundle_key = bundle_key_from_url(store, mv.source)
        bundle_dir = local_bundle(cfg, store, bundle_key, f"{mv.name}-v{mv.version}")
        # What was approved is what is served: the digest, and the approval's signature.
        digest = verified_bundle(mv, bundle_dir, public_key=cfg.signing.public_key)
        ingest_out = ctx.ledger.read("ingest").outputs
        x, _ = load_dataset(store, ingest_out["dataset"], ingest_out["version"]).test()
        # Held-out rows are replayed as traffic for a canary's analysis.
        outcome = target.deploy(model=mv.name, version=str(mv.version), bundle_dir=Path(bundle_dir),
                                serving=cfg.serving, state_dir=Path(cfg.home) / "serving", replay_rows=x)
        v2_url = f"{outcome.url}/v2/models/{mv.name}/infer"
        rec.outputs = {"url": outcome.url, "v1_url": f"{outcome.url}/v1/models/{mv.name}:predict", "v2_url": v2_url,
                       "model_version": mv.version, "rollout": outcome.action, "stable_version": outcome.stable_version,
                       "reason": outcome.reason, "rollout_id": outcome.rollout_id, "max_weight": outcome.max_weight,
                       "grpc_target": outcome.grpc_target, "target": target.name, "bundle_digest": digest}
        if outcome.stable_version != str(mv.version):
            rec.outputs["deployed"] = False
            rec.message = (f"canary v{mv.version} {outcome.action.replace('_', ' ')} at {outcome.max_weight}%: "
                           f"{outcome.reason}; v{outcome.stable_version} keeps serving {outcome.url}")
            return ""
        # Smoke test: held-out samples through V1 and V2 must give exactly the offline answers.
        evaluation = json.loads(store.get_text(f"runs/{run_id}/evaluation.json"))
        n = min(cfg.serving.smoke_samples, len(x))
        token = first_token(cfg.serving.auth_token_file) if cfg.serving.auth_token_file else None
        report = smoke_test(outcome.url, mv.name, x[:n], expected=evaluation["predictions"][:n], min_accuracy=1.0,
                            token=token)
        rec.outputs.update({"deployed": True, "smoke_samples": n, "smoke_agreement": report.accuracy})
        how = {"deployed": "deployed", "promoted": "canary promoted 10->50->100", "replaced": "replaced",
               "unchanged": "already serving"}.get(outcome.action, outcome.action)
        rec.message = f"{v2_url} ({how}; smoke test: {n} held-out samples via V1 and V2 match offline evaluation)"
        return v2_url

    return run_stage("deploy", ctx, body)
