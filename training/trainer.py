"""Distributed training on Ray Train, resumable and fault tolerant.

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
import math
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
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
    "train_loop_per_worker",
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


def _steps_prefix(run_id: str) -> str:
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
    for key in store.list(_steps_prefix(run_id)):
        for line in store.get_text(key).splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------ worker side


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split_validation(x, y, fraction: float, seed: int):
    """Stratified, seeded hold-out of the training split; identical on every worker."""
    if fraction <= 0:
        return x, y, None, None
    from sklearn.model_selection import train_test_split

    idx_train, idx_val = train_test_split(range(len(y)), test_size=fraction, stratify=y, random_state=seed)
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val]


def _inner(model):
    return model.module if hasattr(model, "module") else model


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _shard_model(model, device):
    """FSDP (``fully_shard``): each parameterised layer is its own shard unit, then the root.

    Per-parameter sharding over a 1-D device mesh of all workers. It runs on CUDA (NCCL)
    and on CPU (gloo) alike, so the same strategy is tested here and used on GPU nodes;
    Ray Train's own ``prepare_model(parallel_strategy="fsdp")`` wraps the older FSDP,
    which refuses CPU-only workers.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = model.to(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for module in model.modules():
        if module is not model and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _prepare_model(model, strategy: str):
    import ray.train.torch

    if strategy == "fsdp":
        import torch

        if not torch.distributed.is_initialized():  # a single worker: nothing to shard over
            return ray.train.torch.prepare_model(model)
        return _shard_model(model, ray.train.torch.get_device())
    return ray.train.torch.prepare_model(model, parallel_strategy=strategy)


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _model_state(model) -> dict:
    """Full (unsharded) model state on CPU; a collective under FSDP (every rank must call;
    rank 0 receives the gathered tensors, other ranks an empty dict)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state_options())
    return {k: v.detach().cpu() for k, v in _inner(model).state_dict().items()}


def _optim_state(model, opt) -> dict:
    """Optimizer state; under FSDP the full state keyed by parameter name (a collective)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=_full_state_options())
    return opt.state_dict()


def _load_states(model, opt, state) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Every rank read the whole checkpoint; each keeps its own shard of it.
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state.model, options=options)
        set_optimizer_state_dict(model, opt, state.optimizer, options=options)
        return
    _inner(model).load_state_dict(state.model)
    opt.load_state_dict(state.optimizer)


def _register_compression(model, kind: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if kind == "none" or not isinstance(model, DistributedDataParallel):
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if kind == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif kind == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif kind == "powersgd":
        # Rank 1 with error feedback; the first 10 steps run uncompressed so the low-rank
        # approximation starts from sensible gradients (PowerSGD paper's warm-up).
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def _maybe_fail(fault: dict | None, epoch: int, rank: int) -> None:
    if not fault or fault["epoch"] != epoch or fault["rank"] != rank:
        return
    markers = Path(fault["marker_dir"])
    markers.mkdir(parents=True, exist_ok=True)
    done = len(list(markers.glob("failure-*")))
    if done >= fault["times"]:
        return
    (markers / f"failure-{done}").write_text(str(time.time()))
    if fault["mode"] == "exit":
        os._exit(17)
    raise RuntimeError(f"injected failure {done + 1} of {fault['times']} at epoch {epoch}, rank {rank}")


def _all_reduce_mean(values: list[float], world: int, device) -> list[float]:
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(t)
        t /= world
    return [float(v) for v in t]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config`` is plain data so it travels to any node."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from kubeml.artifacts import open_store
    from kubeml.data import load_dataset
    from kubeml.training.checkpoint import TrainState, checkpoint_dir_name, load_latest_valid, save_checkpoint
    from kubeml.training.loop import Stepper, capture_rng, evaluate, make_optimizer, make_scheduler, restore_rng, windows
    from kubeml.models import build_model

    t_start, started_wall = time.perf_counter(), time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = config["training"]
    seed = config["seed"]
    _seed_everything(seed)
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))

    store = open_store(config["store_uri"], endpoint_url=config.get("endpoint_url"),
                       sse_kms_key_id=config.get("sse_kms_key_id"))
    ds = load_dataset(store, config["dataset"], config["dataset_version"])
    x, y = ds.train()
    x, y, xv, yv = _split_validation(x, y, tc["validation_fraction"], seed)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    # Same seed on every worker, so the shards are a partition of one permutation.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data, batch_size=tc["batch_size"], sampler=sampler)

    model = build_model(tc["model"], **tc.get("model_kwargs", {}))
    model = _prepare_model(model, tc["strategy"])
    _register_compression(model, tc["grad_compression"])
    device = ray.train.torch.get_device()
    opt = make_optimizer(model, learning_rate=tc["learning_rate"], weight_decay=tc["weight_decay"])
    k = tc["grad_accum_steps"]
    steps_per_epoch = math.ceil(len(loader) / k)
    epochs = tc["epochs"]
    sched = make_scheduler(opt, kind=tc["lr_schedule"], total_steps=epochs * steps_per_epoch,
                           warmup_fraction=tc["warmup_fraction"], min_lr_ratio=tc["min_lr_ratio"])
    stepper = Stepper(model, opt, precision=tc["precision"], device=device, scheduler=sched,
                      grad_clip_norm=tc["grad_clip_norm"])
    xv_t = torch.from_numpy(xv) if xv is not None else None
    yv_t = torch.from_numpy(yv) if yv is not None else None
    monitor = "val_loss" if xv is not None else "loss"

    # One token per worker-group start, chosen by rank 0, names this attempt's checkpoints.
    token = [secrets.token_hex(3)]
    if world > 1:
        torch.distributed.broadcast_object_list(token, src=0)
    attempt = token[0]

    start_epoch, global_step, history = 0, 0, []
    extra: dict[str, Any] = {"best": None, "bad_epochs": 0, "attempts": [], "first_step_wall": None}
    skipped: list[str] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with tempfile.TemporaryDirectory() as scratch:
            state, skipped = load_latest_valid(ckpt, scratch=scratch)
        if state is not None:
            _load_states(model, opt, state)
            sched.load_state_dict(state.scheduler)
            if stepper.scaler is not None and state.scaler:
                stepper.scaler.load_state_dict(state.scaler)
            if len(state.rng) == world:
                restore_rng(state.rng[rank])
            start_epoch, global_step, history = state.epoch, state.global_step, list(state.history)
            extra.update(state.extra)
    extra["attempts"] = [*extra["attempts"], {"attempt": attempt, "start_epoch": start_epoch,
                                              "skipped_corrupt": skipped, "world_size": world}]

    setup_done_wall = time.time()
    writer = store if rank == 0 else None
    last_progress = 0.0
    profiler = None
    if tc.get("profile") and rank == 0:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        profiler = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1))
        profiler.start()

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, total = 0.0, 0, 0
        steps: list[dict[str, Any]] = []
        for i, window in enumerate(windows(loader, k)):
            m = stepper.step(window)
            global_step += 1
            now = time.time()
            if extra["first_step_wall"] is None:
                extra["first_step_wall"] = now
                extra["time_to_first_step_s"] = now - config["submitted_at"]
                extra["worker_time_to_first_step_s"] = time.perf_counter() - t_start
                # Where the time to first step went (wall clock, rank 0's view, first attempt).
                extra["startup_s"] = {
                    "ray_init": config["ray_ready_at"] - config["submitted_at"],
                    "worker_spawn": started_wall - config["ray_ready_at"],
                    "worker_setup": setup_done_wall - started_wall,
                    "first_step": now - setup_done_wall,
                }
            loss_sum += m.loss * m.samples
            correct += m.correct
            total += m.samples
            if profiler is not None:
                profiler.step()
                if global_step - start_epoch * steps_per_epoch >= 6:
                    profiler.stop()
                    with tempfile.TemporaryDirectory() as tmp:
                        trace = os.path.join(tmp, "trace.json")
                        profiler.export_chrome_trace(trace)
                        store.put_file(f"runs/{config['run_id']}/train/profile-rank0.json", trace)
                    profiler = None
            if writer is not None:
                rec = {"step": global_step, "epoch": epoch + 1, "loss": m.loss, "lr": m.lr,
                       "samples_per_s": m.samples * world / m.step_s if m.step_s > 0 else float("nan"),
                       "grad_norm": m.grad_norm, "step_s": m.step_s, "skipped": m.skipped, "time": now}
                steps.append(rec)
                if now - last_progress >= PROGRESS_INTERVAL_S or i == steps_per_epoch - 1:
                    last_progress = now
                    writer.put_text(progress_key(config["run_id"]), json.dumps(
                        {**rec, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                         "total_steps": epochs * steps_per_epoch, "attempt": attempt}))
            _maybe_fail(config.get("fault"), epoch, rank)

        stats = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(stats)
        epoch_s = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "loss": float(stats[0] / stats[2]),
            "train_accuracy": float(stats[1] / stats[2]),
            "samples_per_s": float(stats[2]) / epoch_s if epoch_s > 0 else float("nan"),
            "epoch_s": epoch_s,
            "lr": float(opt.param_groups[0]["lr"]),
            "time_to_first_step_s": float(extra.get("time_to_first_step_s") or 0.0),
        }
        if xv_t is not None:
            # Every rank scores the whole (small) validation set; averaging makes the value,
            # and so the early-stopping decision, identical on all ranks.
            metrics["val_loss"], metrics["val_accuracy"] = _all_reduce_mean(
                list(evaluate(_inner(model), xv_t, yv_t, device=device, autocast=stepper.autocast())), world, device)
        score = metrics[monitor]
        best = extra["best"]
        if best is None or score < best - tc["early_stopping_min_delta"]:
            extra["best"], extra["bad_epochs"] = score, 0
        else:
            extra["bad_epochs"] += 1
        patience = tc["early_stopping_patience"]
        stop = patience is not None and extra["bad_epochs"] >= patience
        metrics["monitor"] = score
        metrics["stopped_early"] = int(stop)
        history.append({k2: float(v) for k2, v in metrics.items()})

        do_ckpt = (epoch + 1) % tc["checkpoint_every_epochs"] == 0 or epoch + 1 == epochs or stop
        rngs = [capture_rng()]
        if do_ckpt and world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, capture_rng())
        model_state = _model_state(model) if do_ckpt else None
        optim_state = _optim_state(model, opt) if do_ckpt else None
        if writer is not None and steps:
            writer.put_text(f"{_steps_prefix(config['run_id'])}/epoch-{epoch + 1:06d}.jsonl",
                            "".join(json.dumps(s) + "\n" for s in steps))
        name = checkpoint_dir_name(epoch + 1, attempt)
        if do_ckpt and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, TrainState(
                    epoch=epoch + 1, global_step=global_step, model=model_state, optimizer=optim_state,
                    scheduler=sched.state_dict(),
                    scaler=stepper.scaler.state_dict() if stepper.scaler is not None else None,
                    rng=rngs, history=history, extra=extra,
                ))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name if do_ckpt else None)
        if stop:
            break


# ------------------------------------------------------------------ driver side


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


def _ensure_ray(cfg: EnvironmentConfig) -> None:
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
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kubeml.training.checkpoint import load_checkpoint
    from kubeml.models import build_model

    t0, submitted_at = time.perf_counter(), time.time()
    tc = cfg.training
    build_model(tc.model, **tc.model_kwargs)  # fail fast on a bad model name or arguments, before Ray
    exists = _run_exists(store, run_id)
    if resume is True and not exists:
        raise ConfigError(f"cannot resume run {run_id!r}: it has no checkpoints in {store.uri}/checkpoints")
    if resume is False and exists:
        raise ConfigError(f"run {run_id!r} already exists in {store.uri}; resume it (--resume) or use a new run id")
    store.put_text(run_spec_key(run_id), json.dumps({
        "config": json.loads(cfg.model_dump_json()), "dataset": dataset, "dataset_version": dataset_version,
        "input_shape": list(input_shape), "classes": list(classes),
    }, indent=2))
    _ensure_ray(cfg)
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
        steps_key=_steps_prefix(run_id),
    )

