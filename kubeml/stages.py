"""The pipeline's stages as plain library functions.

Each KFP component in ``components/`` is a thin wrapper that calls one function here, so
the logic lives once and runs the same under ``kfp.local``, on a Kubeflow cluster, or
called directly from Python. Every stage takes the environment config as JSON (a KFP
parameter), records itself in the run ledger, and returns plain values.
"""

from __future__ import annotations

import json
from typing import Any

from kubeml.artifacts import open_store
from kubeml.config import EnvironmentConfig
from kubeml.errors import ArtifactNotFound, RegistryError
from kubeml.ledger import Ledger

__all__ = [
    "deploy_stage",
    "evaluate_stage",
    "gate_stage",
    "ingest_stage",
    "register_stage",
    "train_stage",
    "validate_stage",
]


def _open(config_json: str, run_id: str):
    cfg = EnvironmentConfig.model_validate_json(config_json)
    store = cfg.artifact_store.open()
    return cfg, store, Ledger(store, run_id)


def ingest_stage(config_json: str, run_id: str) -> tuple[str, str]:
    """Returns ``(dataset name, dataset version)``."""
    from kubeml.data import ingest

    cfg, store, ledger = _open(config_json, run_id)
    with ledger.stage("ingest") as rec:
        m = ingest(store, cfg.data)
        rec.outputs = {"dataset": m.name, "version": m.version, "rows": m.rows, "train_rows": m.train_rows, "test_rows": m.test_rows}
        rec.message = f"{m.name}@{m.version} ({m.rows} rows)"
    return m.name, m.version


def validate_stage(config_json: str, run_id: str, dataset: str, version: str) -> str:
    """Raises DataValidationError (failing the run) listing every failed constraint; returns the report as JSON."""
    from kubeml.data import load_dataset, validate

    cfg, store, ledger = _open(config_json, run_id)
    with ledger.stage("validate") as rec:
        ds = load_dataset(store, dataset, version)
        report = validate(ds, cfg.data.validation)
        rec.outputs = report
        rec.message = f"{report['rows']} rows, {report['features']} features: all constraints hold"
    return json.dumps(report)


def train_stage(config_json: str, run_id: str, dataset: str, version: str) -> str:
    """Returns the model bundle's store key (``models/RUN_ID/bundle``, whichever the target).

    ``training.target`` of the environment picks the launcher: ``local`` runs Ray Train on
    this machine's Ray runtime; ``kuberay`` / ``sagemaker`` create a KubeRay ``RayJob`` / ACK
    SageMaker ``TrainingJob``, follow it to the end (each status change goes to the ledger
    and the step's log), and read back what the job wrote to the (S3) artifact store; see
    :mod:`kubeml.training.launch`. A retried step adopts the job it started before.
    """
    cfg, store, ledger = _open(config_json, run_id)
    target = cfg.training.target
    with ledger.stage("train") as rec:
        if target == "local":
            from kubeml.training.trainer import fit

            result = fit(cfg, store, dataset=dataset, dataset_version=version, run_id=run_id)
            checkpoint_uri, epochs, history = result.checkpoint_uri, result.epochs, result.history
            first_step_s, bundle_key, job = result.time_to_first_step_s, result.bundle_key, None
        else:
            from kubeml.training.launch import cancel_on_sigterm, train_on_cluster

            def on_status(line: str) -> None:
                rec.message = f"{target} job: {line}"
                print(f"train: {rec.message}", flush=True)  # the step's log
                ledger.write(rec)

            with cancel_on_sigterm() as stop:  # a cancelled KFP run deletes the job it started
                res = train_on_cluster(cfg, store, target=target, run_id=run_id, dataset=dataset,
                                       dataset_version=version, on_status=on_status, stop=stop)
            checkpoint_uri, epochs, history = res.checkpoint_uri, res.epochs, res.history
            first_step_s, bundle_key = res.time_to_first_step_s, res.bundle_key
            job = {"kind": res.job.kind, "namespace": res.job.namespace, "name": res.job.name,
                   "status": res.job.status, "transitions": list(res.job.transitions), "adopted": res.job.adopted,
                   "replaced": res.job.replaced, "wait_s": res.job.wall_s, "model_artifacts": res.job.model_artifacts}
        last = history[-1] if history else {}
        rec.outputs = {
            "target": target,
            "bundle_key": bundle_key,
            "bundle_uri": store.url(bundle_key),
            "checkpoint_uri": checkpoint_uri,
            "epochs": epochs,
            "final_loss": last.get("loss"),
            "train_accuracy": last.get("train_accuracy"),
            "samples_per_s": last.get("samples_per_s"),
            "time_to_first_step_s": first_step_s,
            "history": list(history),
        }
        if job:
            rec.outputs["job"] = job
        where = f"{job['kind']} {job['namespace']}/{job['name']}, " if job else ""
        rec.message = (
            f"{where}{cfg.training.workers} workers, {epochs} epochs, "
            f"loss {last.get('loss', float('nan')):.4f}, {last.get('samples_per_s', 0):.0f} samples/s"
        )
    return bundle_key


def _local_bundle(cfg: EnvironmentConfig, store, bundle_key: str, dest_name: str):
    from pathlib import Path

    local = store.local_path(bundle_key)
    if local is not None:
        return local
    dest = Path(cfg.home) / "cache" / "bundles" / dest_name
    return store.get_dir(bundle_key, dest)


def evaluate_stage(config_json: str, run_id: str, dataset: str, version: str, bundle_key: str) -> tuple[float, float]:
    """Returns ``(accuracy, macro_f1)`` on the held-out split; writes the full report to the ledger."""
    from kubeml.bundle import load_bundle
    from kubeml.data import load_dataset
    from kubeml.evaluation import evaluate_model

    cfg, store, ledger = _open(config_json, run_id)
    with ledger.stage("evaluate") as rec:
        ds = load_dataset(store, dataset, version)
        model, spec = load_bundle(_local_bundle(cfg, store, bundle_key, run_id))
        x, y = ds.test()
        report = evaluate_model(model, x, y, num_classes=len(spec.classes))
        store.put_text(
            f"runs/{run_id}/evaluation.json",
            json.dumps(
                {**report.metrics(), "confusion_matrix": report.confusion_matrix, "predictions": report.predictions},
            ),
        )
        rec.outputs = {**report.metrics(), "confusion_matrix": report.confusion_matrix}
        rec.message = f"accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {report.samples} held-out samples"
    return report.accuracy, report.macro_f1


def gate_stage(config_json: str, run_id: str, accuracy: float, macro_f1: float) -> str:
    """Returns ``"passed"`` or ``"failed"``; a failure is a clean outcome, recorded with its reasons."""
    from kubeml.evaluation import gate

    cfg, _, ledger = _open(config_json, run_id)
    with ledger.stage("gate") as rec:
        decision = gate({"accuracy": accuracy, "macro_f1": macro_f1}, cfg.gate)
        rec.outputs = {"passed": decision.passed, "reasons": list(decision.reasons),
                       "min_accuracy": cfg.gate.min_accuracy, "min_macro_f1": cfg.gate.min_macro_f1}
        rec.message = "passed" if decision.passed else "failed: " + decision.summary()
    return "passed" if decision.passed else "failed"


def register_stage(
    config_json: str, run_id: str, dataset: str, version: str, bundle_key: str, code_version: str
) -> int:
    """Registers the bundle as the next model version; returns the version number."""
    from kubeml.registry import Registry

    cfg, store, ledger = _open(config_json, run_id)
    with ledger.stage("register") as rec:
        evaluation = json.loads(store.get_text(f"runs/{run_id}/evaluation.json"))
        metrics = {k: evaluation[k] for k in ("accuracy", "macro_f1", "test_samples")}
        train = ledger.read("train").outputs
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
                  "checkpoint_uri": train.get("checkpoint_uri", "")},
            auto_approve=cfg.approval == "auto",
        )
        rec.outputs = {"model_name": mv.name, "version": mv.version, "approval_status": mv.approval_status, "source": mv.source}
        rec.message = f"{mv.name} version {mv.version} ({mv.approval_status})"
    return mv.version


def deploy_stage(config_json: str, run_id: str, model_version: int) -> str:
    """Serves an approved version on localhost, smoke-tests it; returns the V2 infer URL.

    A pending version is not deployed: the stage records that it awaits approval and
    returns an empty string.
    """
    from pathlib import Path

    from kubeml.data import load_dataset
    from kubeml.registry import Registry
    from kubeml.serving.client import smoke_test
    from kubeml.serving.rollout.local import deploy_local

    cfg, store, ledger = _open(config_json, run_id)
    with ledger.stage("deploy") as rec:
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
        bundle_key = _key_from_url(store, mv.source)
        bundle_dir = _local_bundle(cfg, store, bundle_key, f"{mv.name}-v{mv.version}")
        ingest_out = ledger.read("ingest").outputs
        x, _ = load_dataset(store, ingest_out["dataset"], ingest_out["version"]).test()
        # The router listens on serving.http_port (REST) and serving.grpc_port (OIP gRPC)
        # whichever version answers. The first version is served directly; a later one goes
        # out as a canary against the one being served, with held-out rows replayed as
        # traffic, and is promoted or rolled back by the analysis. Version servers get the
        # serving section's batching and timeout keys.
        outcome = deploy_local(
            mv.name, str(mv.version), bundle_dir, state_dir=Path(cfg.home) / "serving",
            host=cfg.serving.host, router_port=cfg.serving.http_port,
            router_grpc_port=cfg.serving.grpc_port, replay_rows=x, **cfg.serving.server_options(),
        )
        v2_url = f"{outcome.url}/v2/models/{mv.name}/infer"
        rec.outputs = {"url": outcome.url, "v1_url": f"{outcome.url}/v1/models/{mv.name}:predict", "v2_url": v2_url,
                       "model_version": mv.version, "rollout": outcome.action, "stable_version": outcome.stable_version,
                       "reason": outcome.reason, "rollout_id": outcome.rollout_id, "max_weight": outcome.max_weight,
                       "grpc_target": outcome.grpc_target}
        if outcome.stable_version != str(mv.version):
            rec.outputs["deployed"] = False
            rec.message = (f"canary v{mv.version} {outcome.action.replace('_', ' ')} at {outcome.max_weight}%: "
                           f"{outcome.reason}; v{outcome.stable_version} keeps serving {outcome.url}")
            return ""
        # Smoke test: held-out samples through V1 and V2 must give exactly the offline answers.
        evaluation = json.loads(store.get_text(f"runs/{run_id}/evaluation.json"))
        n = min(cfg.serving.smoke_samples, len(x))
        report = smoke_test(outcome.url, mv.name, x[:n], expected=evaluation["predictions"][:n], min_accuracy=1.0)
        rec.outputs.update({"deployed": True, "smoke_samples": n, "smoke_agreement": report.accuracy})
        how = {"deployed": "deployed", "promoted": "canary promoted 10->50->100", "replaced": "replaced",
               "unchanged": "already serving"}.get(outcome.action, outcome.action)
        rec.message = f"{v2_url} ({how}; smoke test: {n} held-out samples via V1 and V2 match offline evaluation)"
    return v2_url


def _key_from_url(store, url: str) -> str:
    root = store.uri.rstrip("/") + "/"
    if not url.startswith(root):
        raise RegistryError(f"model source {url} is outside the artifact store {store.uri}")
    key = url[len(root):]
    if not store.list(key):
        raise ArtifactNotFound(f"model bundle {url} is missing from the artifact store")
    return key
