"""Ray Train (kubeml's path) vs a plain PyTorch DDP script: same model, data, epochs, workers.

Both sides train the digits CNN on the same stored dataset version with 2 CPU workers
(gloo), the same per-worker batch, the same optimizer and schedule and the same
:class:`~kubeml.training.loop.Stepper`. The digits training split is tiled ``--repeat``
times (default 8) so that an epoch lasts seconds: with the bare 1437 rows an epoch is
~0.4 s and the per-epoch bookkeeping of either side (a barrier, Ray's report) decides the
ratio instead of the training steps.

Order in one run: plain, kubeml on a fresh local Ray ("cold"), kubeml again on the running
Ray ("warm": what a RayJob's cluster or a second run in one process sees), plain again.
The two plain runs bracket the kubeml ones, so a change in machine load shows up as a
difference between them. Reported:

- steady-state throughput (samples/s over all epochs but the first) and the ratio
  kubeml / plain, each side the mean of its two runs (target >= 0.95);
- time to first step: from the call (``fit`` / process spawn) to the end of the first
  optimizer step (target <= 10 s), cold and warm, with kubeml's split into phases
  (``TrainResult.startup_s``) and plain's into spawn / setup / first step.

Run: ``python benchmarks/training/bench_ray_vs_ddp.py [--epochs N] [--repeat R] [--append-results]``.
Prints JSON; with ``--append-results`` adds a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
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
    from kubeml.models import build_model

    started = time.time()
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
    setup_done = time.time()
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
        Path(out).write_text(json.dumps({"first_step_wall": first, "epochs": epochs, "started_wall": started,
                                         "setup_done_wall": setup_done}))
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
            "startup_s": {"spawn": res["started_wall"] - t0, "worker_setup": res["setup_done_wall"] - res["started_wall"],
                          "first_step": res["first_step_wall"] - res["setup_done_wall"]},
            "steady_samples_per_s": sum(e["samples"] for e in steady) / sum(e["epoch_s"] for e in steady)}


def run_kubeml(cfg, store, m, tag: str) -> dict:
    from kubeml.training.fit import fit

    r = fit(cfg, store, dataset=m.name, dataset_version=m.version, run_id=f"bench-{tag}-{int(time.time())}")
    steady = r.history[1:] or r.history
    samples = sum(h["samples_per_s"] * h["epoch_s"] for h in steady)
    return {"time_to_first_step_s": r.time_to_first_step_s, "startup_s": r.startup_s,
            "steady_samples_per_s": samples / sum(h["epoch_s"] for h in steady), "wall_s": r.wall_s}


def tiled_digits(cfg, repeat: int):
    """The digits data set with its training rows tiled ``repeat`` times (test rows once)."""
    import numpy as np

    from kubeml.data import Dataset, load_source

    ds = load_source(cfg.data)
    train = np.flatnonzero(~ds.is_test)
    idx = np.concatenate([np.flatnonzero(ds.is_test), np.tile(train, repeat)])
    return Dataset(x=ds.x[idx], y=ds.y[idx], is_test=ds.is_test[idx], feature_names=ds.feature_names)


def _phases(startup: dict | None) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in (startup or {}).items())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeat", type=int, default=8, help="tile the training rows this many times")
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
        m = ingest(store, cfg.data, name=f"digits-x{a.repeat}", source=tiled_digits(cfg, a.repeat))
        args = {"store": store.uri, "dataset": m.name, "version": m.version, "seed": cfg.data.seed,
                "epochs": a.epochs, "batch_size": a.batch_size, "workers": a.workers}
        plain1 = run_plain(args)
        cold = run_kubeml(cfg, store, m, "cold")
        warm = run_kubeml(cfg, store, m, "warm")
        ray.shutdown()
        plain2 = run_plain(args)
    plain_tp = (plain1["steady_samples_per_s"] + plain2["steady_samples_per_s"]) / 2
    kube_tp = (cold["steady_samples_per_s"] + warm["steady_samples_per_s"]) / 2
    result = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, CPU only",
        "epochs": a.epochs, "workers": a.workers, "batch_size": a.batch_size, "repeat": a.repeat,
        "train_rows": m.train_rows,
        "plain_ddp": [plain1, plain2], "kubeml_cold": cold, "kubeml_warm": warm,
        "throughput_ratio": kube_tp / plain_tp,
        "plain_spread": abs(plain1["steady_samples_per_s"] - plain2["steady_samples_per_s"]) / plain_tp,
    }
    print(json.dumps(result, indent=2))
    if a.append_results:
        path = Path(__file__).resolve().parents[1] / "RESULTS.md"
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        rows = [("plain DDP (torch.multiprocessing), first", plain1), ("kubeml fit, cold Ray", cold),
                ("kubeml fit, warm Ray", warm), ("plain DDP, second", plain2)]
        with path.open("a") as f:
            f.write(
                f"\n## Training: Ray Train vs plain PyTorch DDP, tiled data ({day})\n\n"
                f"Machine: {result['machine']}. digits CNN, {a.workers} workers (gloo), batch {a.batch_size}/worker, "
                f"{a.epochs} epochs over the training rows tiled {a.repeat}x ({m.train_rows} rows); "
                f"steady state = epochs 2..{a.epochs}.\n\n"
                "| path | steady samples/s | time to first step (s) | phases (s) |\n|---|---:|---:|---|\n"
                + "".join(f"| {name} | {r['steady_samples_per_s']:.0f} | {r['time_to_first_step_s']:.1f} | "
                          f"{_phases(r['startup_s'])} |\n" for name, r in rows)
                + f"\nThroughput ratio kubeml / plain (means of two runs each): **{result['throughput_ratio']:.2f}** "
                f"(target >= 0.95); the two plain runs differ by {result['plain_spread']:.0%}.\n")


if __name__ == "__main__":
    main()
