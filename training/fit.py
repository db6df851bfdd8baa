"""Distributed training on Ray Train, resumable and fault tolerant: the driver side.

Where it sits: :func:`fit` is what every training run calls (the local launcher, the job
entry point :mod:`kubeml.training.ray_main`, ``kubeml train``); the loop each worker runs is
:func:`kubeml.training.worker.train_loop_per_worker`. This module also holds the run's store
layout (spec, progress, per-step metrics) and readers for it.

:func:`fit` runs a ``TorchTrainer`` over ``TrainingConfig.workers`` workers on whichever Ray
cluster ``ray.init`` finds: a local runtime started on demand, or the cluster a KubeRay
``RayJob`` runs inside. Every worker reads the same dataset version from the artifact
store and trains on its own shard (``DistributedSampler``: one seeded permutation,
partitioned by rank).

Checkpoints (:mod:`kubeml.training.checkpoint`) are written by rank 0 every
``checkpoint_every_epochs`` epochs and at the end, into the artifact store under
``checkpoints/RUN_ID/epoch-NNNNNN-ATTEMPT``; Ray keeps the best ``keep_checkpoints`` by the
monitored metric plus the latest. They hold model, optimizer, scheduler, scaler, epoch,
every rank's RNG state and the metric history, so a run continues exactly:

- after a worker dies, Ray restarts the worker group (``FailureConfig(max_failures)``) and
  each worker restores ``ray.train.get_checkpoint()``, falling back past a corrupt one;
- ``fit(..., resume=True)`` (``kubeml train --resume RUN``) re-attaches to the run's
  storage, and Ray hands the workers the latest checkpoint the same way.

Rank 0 also writes per-step metrics (loss, samples/s, learning rate, gradient norm) to
``runs/RUN_ID/train/steps/epoch-NNNNNN.jsonl`` and a small ``progress.json`` for the CLI's
progress bar.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from kubeml.artifacts import ArtifactStore
from kubeml.bundle import BundleSpec, save_bundle
from kubeml.config import EnvironmentConfig
from kubeml.errors import ConfigError, KubemlError, TrainingFailed

__all__ = [
    "FaultInjection",
    "TrainResult",
    "TrainingFailed",
    "fit",
    "progress_key",
    "read_progress",
    "read_steps",
    "run_spec_key",
    "steps_prefix",
]

#: Minimum seconds between two progress.json writes: the CLI polls at 4 Hz, and on S3
#: every write is a PUT request.
PROGRESS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class FaultInjection:
    """Chaos hook: make one worker die at a chosen point, a bounded number of times.

    The worker of ``rank`` dies right after the first optimizer step of ``epoch`` (0-based)
    while fewer than ``times`` marker files exist in ``marker_dir``; it writes one marker
    before dying, so the count survives the process. ``mode="exit"`` kills the process
    (``os._exit``, as the OOM killer or a lost node would); ``"raise"`` raises an error.
    """

    epoch: int
    marker_dir: str
    rank: int = 0
    times: int = 1
    mode: Literal["exit", "raise"] = "exit"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    bundle_key: str
    """Store key (prefix) of the model bundle."""
    epochs: int
    """Epochs completed (fewer than configured when early stopping ended the run)."""
    history: tuple[dict[str, float], ...]
    """Per-epoch metrics of the whole run (across restarts): loss, train_accuracy, val_loss,
    val_accuracy, samples_per_s, epoch_s, lr."""
    checkpoint_uri: str
    """The final checkpoint (the one the bundle was made from)."""
    time_to_first_step_s: float
    """Seconds from :func:`fit` being called to the end of the first optimizer step (first attempt)."""
    wall_s: float
    startup_s: dict[str, float] | None = None
    """The time to first step by phase: ``ray_init`` (starting or joining Ray), ``worker_spawn``
    (the worker group's processes and placement), ``worker_setup`` (process group, data and
    model on the worker), ``first_step``."""
    best_checkpoint_uri: str = ""
    """Checkpoint with the best monitored metric (``val_loss``, or ``loss`` without validation)."""
    stopped_early: bool = False
    attempts: tuple[dict[str, Any], ...] = ()
    """One entry per worker-group start: the epoch it started from and any corrupt checkpoints it skipped."""
    steps_key: str = ""
    """Store prefix of the per-step metrics (JSON lines, one file per epoch)."""


def run_spec_key(run_id: str) -> str:
    return f"runs/{run_id}/train/spec.json"


def progress_key(run_id: str) -> str:
    return f"runs/{run_id}/train/progress.json"


def steps_prefix(run_id: str) -> str:
    """Store prefix of a run's per-step metrics (JSON lines, one file per epoch)."""
    return f"runs/{run_id}/train/steps"


def read_progress(store: ArtifactStore, run_id: str) -> dict[str, Any] | None:
    """The latest progress record of a run, or None before the first step."""
    try:
        return json.loads(store.get_text(progress_key(run_id)))
    except (KubemlError, ValueError):
        return None


def read_steps(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    """Every per-step record of a run, in step order (the latest attempt wins for repeated steps)."""
    by_step: dict[int, dict[str, Any]] = {}
    for key in store.list(steps_prefix(run_id)):
        for line in store.get_text(key).splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------ driver


def _storage(store: ArtifactStore) -> tuple[str, Any]:
    """(storage_path, filesystem) for Ray Train checkpoints inside the artifact store."""
    local = store.local_path("checkpoints")
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        return str(local), None
    import pyarrow.fs

    endpoint = getattr(store, "endpoint_url", None)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint) if endpoint else pyarrow.fs.S3FileSystem()
    base = store.uri[len("s3://") :].rstrip("/")
    return f"{base}/checkpoints", fs


def _run_exists(store: ArtifactStore, run_id: str) -> bool:
    return bool(store.list(f"checkpoints/{run_id}"))


def ensure_ray(cfg: EnvironmentConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside a RayJob or with an explicit cluster
        return
    need = cfg.training.workers * cfg.training.cpus_per_worker
    ray.init(
        num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def _uri(path: str, fs: Any) -> str:
    if "://" in path:
        return path
    return "file://" + path if fs is None else "s3://" + path


def fit(
    cfg: EnvironmentConfig,
    store: ArtifactStore,
    *,
    dataset: str,
    dataset_version: str,
    run_id: str,
    input_shape: tuple[int, ...] = (64,),
    classes: tuple[str, ...] = tuple(str(i) for i in range(10)),
    resume: bool | None = None,
    fault: FaultInjection | None = None,
) -> TrainResult:
    """Train ``cfg.training.model`` on a stored dataset version; write a bundle; return the result.

    ``resume``: None continues the run if it has checkpoints (a retried pipeline step picks
    up where it stopped) and starts it otherwise; True requires checkpoints to continue from;
    False requires a fresh run id. ``fault`` injects worker failures (chaos testing).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kubeml.data import dataset_manifest
    from kubeml.models import build_model
    from kubeml.training.checkpoint import load_checkpoint
    from kubeml.training.worker import train_loop_per_worker

    t0, submitted_at = time.perf_counter(), time.time()
    tc = cfg.training
    build_model(tc.model, **tc.model_kwargs)  # fail fast on a bad model name or arguments, before Ray
    # A version that is not stored fails here, once, not in every worker of every retried attempt.
    dataset_manifest(store, dataset, dataset_version)
    exists = _run_exists(store, run_id)
    if resume is True and not exists:
        raise ConfigError(f"cannot resume run {run_id!r}: it has no checkpoints in {store.uri}/checkpoints")
    if resume is False and exists:
        raise ConfigError(f"run {run_id!r} already exists in {store.uri}; resume it (--resume) or use a new run id")
    store.put_text(run_spec_key(run_id), json.dumps({
        "config": json.loads(cfg.model_dump_json()), "dataset": dataset, "dataset_version": dataset_version,
        "input_shape": list(input_shape), "classes": list(classes),
    }, indent=2))
    ensure_ray(cfg)
    ray_ready_at = time.time()
    storage_path, fs = _storage(store)
    loop_config = {
        "run_id": run_id,
        "store_uri": store.uri,
        "endpoint_url": getattr(store, "endpoint_url", None),
        "sse_kms_key_id": getattr(store, "sse_kms_key_id", None),
        "dataset": dataset,
        "dataset_version": dataset_version,
        "training": json.loads(tc.model_dump_json()),
        "seed": cfg.data.seed,
        "threads_per_worker": max(1, int(tc.cpus_per_worker)),
        "submitted_at": submitted_at,
        "ray_ready_at": ray_ready_at,
        "fault": asdict(fault) if fault else None,
    }
    monitor_mode = "min"  # val_loss or loss: lower is better
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tc.workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints, checkpoint_score_attribute="monitor",
                checkpoint_score_order=monitor_mode,
            ),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; keep the cause, say where and how to go on
        raise TrainingFailed(
            f"training run {run_id} failed (max_failures={tc.max_failures} exhausted): {exc}\n"
            f"continue from its last checkpoint with: kubeml train --resume {run_id}"
        ) from exc
    if result.error is not None:
        raise TrainingFailed(f"training run {run_id} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainingFailed(f"training run {run_id} finished without a checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        state = load_checkpoint(result.checkpoint.to_directory(os.path.join(tmp, "final")))
    model = build_model(tc.model, **tc.model_kwargs)
    model.load_state_dict(state.model)
    spec = BundleSpec(
        arch=tc.model,
        arch_kwargs=dict(tc.model_kwargs),
        input_shape=tuple(input_shape),
        classes=tuple(classes),
        input_dtype="FP32",
        input_min=cfg.data.validation.min_value,
        input_max=cfg.data.validation.max_value,
        metadata={"run_id": run_id, "dataset": dataset, "dataset_version": dataset_version, "epochs": state.epoch},
    )
    bundle_key = f"models/{run_id}/bundle"
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(tmp, model, spec)
        store.put_dir(bundle_key, tmp)
    best_uri = ""
    if result.best_checkpoints:
        best_ckpt, _ = min(result.best_checkpoints, key=lambda cm: cm[1].get("monitor", float("inf")))
        best_uri = _uri(best_ckpt.path, fs)
    history = tuple(state.history)
    return TrainResult(
        run_id=run_id,
        bundle_key=bundle_key,
        epochs=state.epoch,
        history=history,
        checkpoint_uri=_uri(result.checkpoint.path, fs),
        time_to_first_step_s=float(state.extra.get("time_to_first_step_s") or float("nan")),
        wall_s=time.perf_counter() - t0,
        startup_s=state.extra.get("startup_s"),
        best_checkpoint_uri=best_uri,
        stopped_early=bool(history and history[-1].get("stopped_early")),
        attempts=tuple(state.extra.get("attempts", ())),
        steps_key=steps_prefix(run_id),
    )

