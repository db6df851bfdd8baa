"""The per-worker training loop of a Ray Train run: :func:`train_loop_per_worker`.

Where it sits: :func:`kubeml.training.fit.fit` (the driver) hands this function to a
``TorchTrainer``; Ray runs it on every worker, with a plain-data config (JSON-like, so it
travels to any node). Each worker reads the dataset version from the artifact store, trains
on its shard with :class:`~kubeml.training.loop.Stepper`, and rank 0 writes checkpoints
(:mod:`kubeml.training.checkpoint`), per-step metrics and ``progress.json``. What a worker
carries from epoch to epoch and, through checkpoints, across restarts is a
:class:`WorkerState`.

The model helpers (:func:`_prepare_model`, :func:`_model_state`, ...) cover DDP and FSDP;
:mod:`kubeml.training.tune` reuses the data helpers.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeml.training.fit import PROGRESS_INTERVAL_S, progress_key, steps_prefix

__all__ = ["WorkerState", "train_loop_per_worker"]


@dataclass
class WorkerState:
    """A worker's run state beyond model and optimizer: kept in every checkpoint (``TrainState.extra``).

    Restored on each worker-group start, so early stopping, the attempt log and the first
    attempt's time to first step survive restarts.
    """

    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-epoch metrics of the whole run."""
    best: float | None = None
    """Best monitored metric so far (lower is better)."""
    bad_epochs: int = 0
    """Epochs since ``best`` last improved by ``early_stopping_min_delta``."""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """One entry per worker-group start: attempt token, start epoch, corrupt checkpoints skipped, world size."""
    first_step_wall: float | None = None
    """Wall clock (``time.time()``) at the end of the run's first optimizer step; None before it."""
    time_to_first_step_s: float | None = None
    """Seconds from ``fit`` being called to the first step's end (first attempt)."""
    worker_time_to_first_step_s: float | None = None
    """Seconds from the worker function starting to the first step's end (first attempt)."""
    startup_s: dict[str, float] | None = None
    """Where the time to first step went: ``ray_init``, ``worker_spawn``, ``worker_setup``, ``first_step``."""

    def extra(self) -> dict[str, Any]:
        """The checkpoint's ``extra`` dict (the timing keys only once the first step ran)."""
        out: dict[str, Any] = {"best": self.best, "bad_epochs": self.bad_epochs, "attempts": list(self.attempts),
                               "first_step_wall": self.first_step_wall}
        if self.first_step_wall is not None:
            out.update(time_to_first_step_s=self.time_to_first_step_s,
                       worker_time_to_first_step_s=self.worker_time_to_first_step_s, startup_s=self.startup_s)
        return out

    @classmethod
    def from_checkpoint(cls, global_step: int, history: list[dict[str, float]], extra: dict[str, Any]) -> WorkerState:
        return cls(
            global_step=global_step,
            history=list(history),
            best=extra.get("best"),
            bad_epochs=int(extra.get("bad_epochs", 0)),
            attempts=list(extra.get("attempts", [])),
            first_step_wall=extra.get("first_step_wall"),
            time_to_first_step_s=extra.get("time_to_first_step_s"),
            worker_time_to_first_step_s=extra.get("worker_time_to_first_step_s"),
            startup_s=extra.get("startup_s"),
        )

    def record_first_step(self, now: float, *, config: dict[str, Any], t_start: float, started_wall: float,
                          setup_done_wall: float) -> None:
        """Note the run's first optimizer step (a no-op after it, restarts included)."""
        if self.first_step_wall is not None:
            return
        self.first_step_wall = now
        self.time_to_first_step_s = now - config["submitted_at"]
        self.worker_time_to_first_step_s = time.perf_counter() - t_start
        # Where the time to first step went (wall clock, rank 0's view, first attempt).
        self.startup_s = {
            "ray_init": config["ray_ready_at"] - config["submitted_at"],
            "worker_spawn": started_wall - config["ray_ready_at"],
            "worker_setup": setup_done_wall - started_wall,
            "first_step": now - setup_done_wall,
        }

    def should_stop(self, score: float, *, min_delta: float, patience: int | None) -> bool:
        """Early stopping: update ``best`` / ``bad_epochs`` with this epoch's score; True to stop."""
        if self.best is None or score < self.best - min_delta:
            self.best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        return patience is not None and self.bad_epochs >= patience


# ------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------ the loop


def _data(config: dict[str, Any], *, rank: int, world: int):
    """This worker's sampler and loader over the training split, and the validation tensors (or None)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from kubeml.data import load_dataset

    tc, seed = config["training"], config["seed"]
    store = _open_store(config)
    ds = load_dataset(store, config["dataset"], config["dataset_version"])
    x, y = ds.train()
    x, y, xv, yv = _split_validation(x, y, tc["validation_fraction"], seed)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    # Same seed on every worker, so the shards are a partition of one permutation.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data, batch_size=tc["batch_size"], sampler=sampler)
    xv_t = torch.from_numpy(xv) if xv is not None else None
    yv_t = torch.from_numpy(yv) if yv is not None else None
    return store, sampler, loader, xv_t, yv_t


def _open_store(config: dict[str, Any]):
    from kubeml.artifacts import open_store

    return open_store(config["store_uri"], endpoint_url=config.get("endpoint_url"),
                      sse_kms_key_id=config.get("sse_kms_key_id"))


def _attempt_token(world: int) -> str:
    """One token per worker-group start, chosen by rank 0, names this attempt's checkpoints."""
    import torch

    token = [secrets.token_hex(3)]
    if world > 1:
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def _restore(model, opt, sched, stepper, *, rank: int, world: int) -> tuple[int, WorkerState, list[str]]:
    """Load the checkpoint Ray hands this worker group, if any: ``(start epoch, state, corrupt skipped)``."""
    import ray.train

    from kubeml.training.checkpoint import load_latest_valid
    from kubeml.training.loop import restore_rng

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, WorkerState(), []
    with tempfile.TemporaryDirectory() as scratch:
        state, skipped = load_latest_valid(ckpt, scratch=scratch)
    if state is None:
        return 0, WorkerState(), skipped
    _load_states(model, opt, state)
    sched.load_state_dict(state.scheduler)
    if stepper.scaler is not None and state.scaler:
        stepper.scaler.load_state_dict(state.scaler)
    if len(state.rng) == world:
        restore_rng(state.rng[rank])
    return state.epoch, WorkerState.from_checkpoint(state.global_step, state.history, state.extra), skipped


def _start_profiler(device):
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1))
    profiler.start()
    return profiler


def _export_profile(profiler, store, run_id: str) -> None:
    profiler.stop()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        profiler.export_chrome_trace(trace)
        store.put_file(f"runs/{run_id}/train/profile-rank0.json", trace)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config`` is plain data so it travels to any node."""
    import ray.train
    import ray.train.torch
    import torch

    from kubeml.models import build_model
    from kubeml.training.checkpoint import TrainState, checkpoint_dir_name, save_checkpoint
    from kubeml.training.loop import Stepper, capture_rng, evaluate, make_optimizer, make_scheduler, windows

    t_start, started_wall = time.perf_counter(), time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = config["training"]
    run_id = config["run_id"]
    _seed_everything(config["seed"])
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))

    store, sampler, loader, xv_t, yv_t = _data(config, rank=rank, world=world)
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
    monitor = "val_loss" if xv_t is not None else "loss"

    attempt = _attempt_token(world)
    start_epoch, state, skipped = _restore(model, opt, sched, stepper, rank=rank, world=world)
    state.attempts = [*state.attempts, {"attempt": attempt, "start_epoch": start_epoch,
                                        "skipped_corrupt": skipped, "world_size": world}]

    setup_done_wall = time.time()
    writer = store if rank == 0 else None
    last_progress = 0.0
    profiler = _start_profiler(device) if tc.get("profile") and rank == 0 else None

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, total = 0.0, 0, 0
        steps: list[dict[str, Any]] = []
        for i, window in enumerate(windows(loader, k)):
            m = stepper.step(window)
            state.global_step += 1
            now = time.time()
            state.record_first_step(now, config=config, t_start=t_start, started_wall=started_wall,
                                    setup_done_wall=setup_done_wall)
            loss_sum += m.loss * m.samples
            correct += m.correct
            total += m.samples
            if profiler is not None:
                profiler.step()
                if state.global_step - start_epoch * steps_per_epoch >= 6:
                    _export_profile(profiler, store, run_id)
                    profiler = None
            if writer is not None:
                rec = {"step": state.global_step, "epoch": epoch + 1, "loss": m.loss, "lr": m.lr,
                       "samples_per_s": m.samples * world / m.step_s if m.step_s > 0 else float("nan"),
                       "grad_norm": m.grad_norm, "step_s": m.step_s, "skipped": m.skipped, "time": now}
                steps.append(rec)
                if now - last_progress >= PROGRESS_INTERVAL_S or i == steps_per_epoch - 1:
                    last_progress = now
                    writer.put_text(progress_key(run_id), json.dumps(
                        {**rec, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                         "total_steps": epochs * steps_per_epoch, "attempt": attempt}))
            _maybe_fail(config.get("fault"), epoch, rank)

        stats = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(stats)
        epoch_s = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": state.global_step,
            "loss": float(stats[0] / stats[2]),
            "train_accuracy": float(stats[1] / stats[2]),
            "samples_per_s": float(stats[2]) / epoch_s if epoch_s > 0 else float("nan"),
            "epoch_s": epoch_s,
            "lr": float(opt.param_groups[0]["lr"]),
            "time_to_first_step_s": float(state.time_to_first_step_s or 0.0),
        }
        if xv_t is not None:
            # Every rank scores the whole (small) validation set; averaging makes the value,
            # and so the early-stopping decision, identical on all ranks.
            metrics["val_loss"], metrics["val_accuracy"] = _all_reduce_mean(
                list(evaluate(_inner(model), xv_t, yv_t, device=device, autocast=stepper.autocast())), world, device)
        score = metrics[monitor]
        stop = state.should_stop(score, min_delta=tc["early_stopping_min_delta"],
                                 patience=tc["early_stopping_patience"])
        metrics["monitor"] = score
        metrics["stopped_early"] = int(stop)
        state.history.append({k2: float(v) for k2, v in metrics.items()})

        do_ckpt = (epoch + 1) % tc["checkpoint_every_epochs"] == 0 or epoch + 1 == epochs or stop
        rngs = [capture_rng()]
        if do_ckpt and world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, capture_rng())
        # Collectives under FSDP: every rank gathers, rank 0 keeps the full state.
        model_state = _model_state(model) if do_ckpt else None
        optim_state = _optim_state(model, opt) if do_ckpt else None
        if writer is not None and steps:
            writer.put_text(f"{steps_prefix(run_id)}/epoch-{epoch + 1:06d}.jsonl",
                            "".join(json.dumps(s) + "\n" for s in steps))
        name = checkpoint_dir_name(epoch + 1, attempt)
        if do_ckpt and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, TrainState(
                    epoch=epoch + 1, global_step=state.global_step, model=model_state, optimizer=optim_state,
                    scheduler=sched.state_dict(),
                    scaler=stepper.scaler.state_dict() if stepper.scaler is not None else None,
                    rng=rngs, history=state.history, extra=state.extra(),
                ))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name if do_ckpt else None)
        if stop:
            break
