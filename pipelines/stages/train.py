"""train: the environment's launcher trains the model; returns the bundle's store key.

``training.target`` picks the launcher through :func:`kubeml.training.launchers.get_launcher`
(a seam, not an ``if``): ``local`` runs Ray Train on this machine's Ray runtime; ``kuberay`` /
``sagemaker`` create a KubeRay ``RayJob`` / ACK SageMaker ``TrainingJob``, follow it to the
end (each status change goes to the ledger and the step's log), and read back what the job
wrote to the (S3) artifact store. A retried attempt adopts the job it started before.
"""

from __future__ import annotations

from kubeml.pipelines.stages._common import RetryPolicy, open_stage, run_stage

__all__ = ["TRAIN_RETRY", "train_stage"]

#: Training is retried twice on a retryable failure (a lost Ray worker past max_failures, a
#: failed or timed-out cluster job, S3 throttling): a retry continues from the checkpoints,
#: or adopts / replaces the cluster job by name, so it loses little.
TRAIN_RETRY = RetryPolicy(retries=2, backoff_s=60.0, factor=2.0)


def train_stage(config_json: str, run_id: str, dataset: str, version: str, *,
                retry: RetryPolicy = TRAIN_RETRY) -> str:
    """Returns the model bundle's store key (``models/RUN_ID/bundle``, whichever the target)."""
    from kubeml.training.launchers import get_launcher

    ctx = open_stage(config_json, run_id)
    cfg = ctx.cfg
    launcher = get_launcher(cfg.training.target)

    def body(rec, attempt):
        _refuse_a_registered_run(cfg, ctx.store, run_id)

        def on_status(line: str) -> None:
            rec.message = f"{launcher.name} job: {line}"
            print(f"train: {rec.message}", flush=True)  # the step's log
            ctx.ledger.write(rec)

        res = launcher.train(cfg, ctx.store, run_id=run_id, dataset=dataset, dataset_version=version,
                             on_status=on_status)
        history = list(res.history)
        last = history[-1] if history else {}
        rec.outputs = {
            "target": launcher.name,
            "bundle_key": res.bundle_key,
            "bundle_uri": ctx.store.url(res.bundle_key),
            "checkpoint_uri": res.checkpoint_uri,
            "epochs": res.epochs,
            "final_loss": last.get("loss"),
            "train_accuracy": last.get("train_accuracy"),
            "samples_per_s": last.get("samples_per_s"),
            "time_to_first_step_s": res.time_to_first_step_s,
            "history": history,
            "attempts": list(res.attempts),
        }
        job = res.job
        if job:
            rec.outputs["job"] = dict(job)
        where = f"{job['kind']} {job['namespace']}/{job['name']}, " if job else ""
        rec.message = (
            f"{where}{cfg.training.workers} workers, {res.epochs} epochs, "
            f"loss {last.get('loss', float('nan')):.4f}, {last.get('samples_per_s', 0):.0f} samples/s"
        )
        return res.bundle_key

    return run_stage("train", ctx, body, policy=retry)


def _refuse_a_registered_run(cfg, store, run_id: str) -> None:
    """A run whose bundle is a registered version never trains again: it would overwrite
    the bundle that version (perhaps approved) points at."""
    from kubeml.errors import ConfigError
    from kubeml.registry import Registry

    url = store.url(f"models/{run_id}/bundle")
    reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
    taken = [v.version for v in reg.versions(cfg.registry.model_name) if v.source == url]
    if taken:
        raise ConfigError(f"run id {run_id!r} already produced {cfg.registry.model_name} version {taken[0]} "
                          f"({url}); start a new run (a new run id) instead of training over it")
