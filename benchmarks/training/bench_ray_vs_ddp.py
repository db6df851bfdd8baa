"""Ray Train (kubeml's path) vs a plain PyTorch DDP script: same model, data, epochs, workers.

Both sides train the digits CNN on the same stored dataset version with 2 CPU workers
(gloo), the same per-worker batch, the same optimizer and schedule and the same
:class:`~kubeml.training.loop.Stepper`. Reported, in one run:

- steady-state throughput (samples/s over all epochs but the first) and the ratio
  kubeml / plain (target >= 0.95);
- time to first step: from the call (``fit`` / process spawn) to the end of the first
  optimizer step (target <= 10 s).

Run: ``python benchmarks/training/bench_ray_vs_ddp.py [--epochs N] [--append-results]``.
Prints JSON; with ``--append-results`` adds a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _plain_worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from kubeml.artifacts import open_store
    from kubeml.data import load_dataset
    from kubeml.training.loop import Stepper, make_optimizer, make_scheduler, windows
    from kubeml.training.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(args["seed"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = load_dataset(open_store(args["store"]), args["dataset"], args["version"]).train()
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args["seed"])
    loader = DataLoader(data, batch_size=args["batch_size"], sampler=sampler)
    model = DistributedDataParallel(build_model("digits_cnn"))
    opt = make_optimizer(model, learning_rate=2e-3, weight_decay=1e-4)
    sched = make_scheduler(opt, kind="warmup_cosine", total_steps=args["epochs"] * len(loader),
                           warmup_fraction=0.15, min_lr_ratio=0.0)
    stepper = Stepper(model, opt, precision="fp32", device=torch.device("cpu"), scheduler=sched)
    first = None
    epochs = []
    for epoch in range(args["epochs"]):
        sampler.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for w in windows(loader, 1):
            n += stepper.step(w).samples
            if first is None:
                first = time.time()
        dist.barrier()
        epochs.append({"epoch_s": time.perf_counter() - t0, "samples": n * world})
    if rank == 0:
        Path(out).write_text(json.dumps({"first_step_wall": first, "epochs": epochs}))
    dist.destroy_process_group()


def run_plain(args: dict) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plain.json")
        t0 = time.time()
        mp.spawn(_plain_worker, args=(args["workers"], port, args, out), nprocs=args["workers"], join=True)
        res = json.loads(Path(out).read_text())
    steady = res["epochs"][1:] or res["epochs"]
    return {"time_to_first_step_s": res["first_step_wall"] - t0,
            "steady_samples_per_s": sum(e["samples"] for e in steady) / sum(e["epoch_s"] for e in steady)}


def run_kubeml(cfg, store, m) -> dict:
    from kubeml.training.trainer import fit

    r = fit(cfg, store, dataset=m.name, dataset_version=m.version, run_id=f"bench-{int(time.time())}")
    steady = r.history[1:] or r.history
    samples = sum(h["samples_per_s"] * h["epoch_s"] for h in steady)
    return {"time_to_first_step_s": r.time_to_first_step_s,
            "steady_samples_per_s": samples / sum(h["epoch_s"] for h in steady), "wall_s": r.wall_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--append-results", action="store_true")
    a = p.parse_args()

    import ray

    from kubeml.artifacts import open_store
    from kubeml.config import KubemlConfig
    from kubeml.data import ingest

    with tempfile.TemporaryDirectory() as home:
        cfg = KubemlConfig(environments={"dev": {"training": {
            "epochs": a.epochs, "workers": a.workers, "batch_size": a.batch_size,
            # Same work as the plain script: no validation pass, one checkpoint at the end.
            "validation_fraction": 0.0, "checkpoint_every_epochs": a.epochs}}}).environment("dev", base=home)
        store = open_store(cfg.artifact_store.uri)
        m = ingest(store, cfg.data)
        args = {"store": store.uri, "dataset": m.name, "version": m.version, "seed": cfg.data.seed,
                "epochs": a.epochs, "batch_size": a.batch_size, "workers": a.workers}
        plain = run_plain(args)
        kube = run_kubeml(cfg, store, m)
        ray.shutdown()
    result = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, CPU only",
        "epochs": a.epochs, "workers": a.workers, "batch_size": a.batch_size,
        "plain_ddp": plain, "kubeml_ray_train": kube,
        "throughput_ratio": kube["steady_samples_per_s"] / plain["steady_samples_per_s"],
    }
    print(json.dumps(result, indent=2))
    if a.append_results:
        path = Path(__file__).resolve().parents[1] / "RESULTS.md"
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        with path.open("a") as f:
            f.write(
                f"\n## Training: Ray Train vs plain PyTorch DDP ({day})\n\n"
                f"Machine: {result['machine']}, shared with other jobs. digits CNN, {a.workers} workers (gloo), "
                f"batch {a.batch_size}/worker, {a.epochs} epochs; steady state = epochs 2..{a.epochs}.\n\n"
                "| path | steady samples/s | time to first step (s) |\n|---|---:|---:|\n"
                f"| plain DDP (torch.multiprocessing) | {plain['steady_samples_per_s']:.0f} | {plain['time_to_first_step_s']:.1f} |\n"
                f"| kubeml fit (Ray Train V2) | {kube['steady_samples_per_s']:.0f} | {kube['time_to_first_step_s']:.1f} |\n\n"
                f"Throughput ratio kubeml / plain: **{result['throughput_ratio']:.2f}** (target >= 0.95).\n")


if __name__ == "__main__":
    main()
