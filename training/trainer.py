"""Distributed training on Ray Train.

:func:`fit` runs a ``TorchTrainer`` (data parallel, DDP) over ``TrainingConfig.workers``
workers on whichever Ray cluster ``ray.init`` finds: a local runtime started on demand,
or the cluster a KubeRay ``RayJob`` runs inside. Every worker reads the same dataset
version from the artifact store and trains on its own shard. Rank 0 writes one
checkpoint per epoch (safetensors weights + JSON state) into the artifact store, and the
final weights become a model bundle.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeml.artifacts import ArtifactStore
from kubeml.bundle import BundleSpec, save_bundle
from kubeml.config import EnvironmentConfig
from kubeml.errors import KubemlError

__all__ = ["TrainResult", "fit", "train_loop_per_worker"]

CKPT_WEIGHTS = "model.safetensors"
CKPT_STATE = "state.json"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    bundle_key: str
    """Store key (prefix) of the model bundle."""
    epochs: int
    history: tuple[dict[str, float], ...]
    """Per-epoch metrics reported by rank 0: loss, train_accuracy, samples_per_s, epoch_s."""
    checkpoint_uri: str
    time_to_first_step_s: float
    wall_s: float


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config`` is plain data so it travels to any node."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from kubeml.artifacts import open_store
    from kubeml.data import load_dataset
    from kubeml.training.models import build_model

    t_start = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(config["seed"])
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))

    store = open_store(config["store_uri"], endpoint_url=config.get("endpoint_url"))
    ds = load_dataset(store, config["dataset"], config["dataset_version"])
    x, y = ds.train()
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    # Same seed on every worker, so the shards are a partition of one permutation.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=config["seed"])
    loader = DataLoader(data, batch_size=config["batch_size"], sampler=sampler)

    model = build_model(config["model"], **config.get("model_kwargs", {}))
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    epochs = config["epochs"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config["learning_rate"], total_steps=epochs * max(1, len(loader)), pct_start=0.15
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    first_step_s = None

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        total, correct, loss_sum = 0, 0, 0.0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            sched.step()
            if first_step_s is None:
                first_step_s = time.perf_counter() - t_start
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(yb)
        # Average across workers so rank 0's report covers the whole epoch.
        stats = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(stats)
        epoch_s = time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1,
            "loss": float(stats[0] / stats[2]),
            "train_accuracy": float(stats[1] / stats[2]),
            "samples_per_s": float(stats[2]) / epoch_s if epoch_s > 0 else float("nan"),
            "epoch_s": epoch_s,
            "time_to_first_step_s": float(first_step_s or 0.0),
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
                save_file(state, os.path.join(tmp, CKPT_WEIGHTS))
                Path(tmp, CKPT_STATE).write_text(json.dumps(metrics))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


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


def fit(
    cfg: EnvironmentConfig,
    store: ArtifactStore,
    *,
    dataset: str,
    dataset_version: str,
    run_id: str,
    input_shape: tuple[int, ...] = (64,),
    classes: tuple[str, ...] = tuple(str(i) for i in range(10)),
) -> TrainResult:
    """Train ``cfg.training.model`` on a stored dataset version; write a bundle; return the result."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from kubeml.training.models import build_model

    t0 = time.perf_counter()
    tc = cfg.training
    build_model(tc.model)  # fail fast on an unknown model name, before starting Ray
    _ensure_ray(cfg)
    storage_path, fs = _storage(store)
    endpoint = getattr(store, "endpoint_url", None)
    loop_config = {
        "store_uri": store.uri,
        "endpoint_url": endpoint,
        "dataset": dataset,
        "dataset_version": dataset_version,
        "model": tc.model,
        "epochs": tc.epochs,
        "batch_size": tc.batch_size,
        "learning_rate": tc.learning_rate,
        "weight_decay": tc.weight_decay,
        "seed": cfg.data.seed,
        "threads_per_worker": max(1, int(tc.cpus_per_worker)),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tc.workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # one per epoch, all kept
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; keep the cause, say where
        raise KubemlError(f"training run {run_id} failed: {exc}") from exc
    if result.checkpoint is None:
        raise KubemlError(f"training run {run_id} finished without a checkpoint")
    history = tuple(
        {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        for m in (result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [result.metrics])
    )
    with result.checkpoint.as_directory() as ckpt_dir:
        model = build_model(tc.model)
        model.load_state_dict(load_file(os.path.join(ckpt_dir, CKPT_WEIGHTS)))
        spec = BundleSpec(
            arch=tc.model,
            input_shape=tuple(input_shape),
            classes=tuple(classes),
            input_dtype="FP32",
            input_min=cfg.data.validation.min_value,
            input_max=cfg.data.validation.max_value,
            metadata={"run_id": run_id, "dataset": dataset, "dataset_version": dataset_version, "epochs": tc.epochs},
        )
        with tempfile.TemporaryDirectory() as tmp:
            save_bundle(tmp, model, spec)
            bundle_key = f"models/{run_id}/bundle"
            store.put_dir(bundle_key, tmp)
    ray_ckpt = result.checkpoint.path
    ckpt_uri = ray_ckpt if "://" in ray_ckpt else ("file://" + ray_ckpt if fs is None else "s3://" + ray_ckpt)
    return TrainResult(
        run_id=run_id,
        bundle_key=bundle_key,
        epochs=tc.epochs,
        history=history,
        checkpoint_uri=ckpt_uri,
        time_to_first_step_s=history[0].get("time_to_first_step_s", float("nan")) if history else float("nan"),
        wall_s=time.perf_counter() - t0,
    )
