"""FSDP, DDP gradient-compression hooks and the profiler trace, on real Ray Train runs.

Every run trains the digits CNN on 2 CPU workers (gloo) with the same seed and data, so
each variant is compared with the plain DDP run step by step (the per-step losses rank 0
records), not merely for "it trained":

- FSDP (``fully_shard``, on CPU with gloo here) shards parameters, gradients and optimizer
  state but computes the same averaged gradient and the same AdamW update, so its losses
  follow DDP's to float tolerance, across a worker's death, and its checkpoint gathers a
  full state dict the bundle and the resumed run use;
- the fp16 hook rounds gradients on the wire: losses stay close to DDP's but are not
  bit-identical (the hook really ran);
- PowerSGD runs plain all-reduce for its first ``start_powerSGD_iter`` (10) steps, so
  those losses match DDP's, and afterwards its rank-1 approximation makes them diverge;
- ``profile: true`` leaves a Chrome trace of rank 0's steps in the run's artifacts.
"""

from __future__ import annotations

import json

import pytest

from kubeml.artifacts import open_store
from kubeml.bundle import load_bundle
from kubeml.config import KubemlConfig
from kubeml.data import ingest, load_dataset
from kubeml.evaluation import evaluate_model
from kubeml.training.fit import FaultInjection, fit, read_steps

pytestmark = pytest.mark.slow

EPOCHS = 3
#: PowerSGD's warm-up: the hook in worker.py starts compressing at this step.
POWERSGD_START = 10


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("par")
    # 600 rows -> 480 train -> 240 per worker -> 8 steps per epoch, 24 in all.
    cfg = KubemlConfig(environments={"dev": {
        "data": {"max_rows": 600, "seed": 5},
        "training": {"epochs": EPOCHS, "workers": 2, "batch_size": 32, "validation_fraction": 0.0,
                     "checkpoint_every_epochs": 1, "learning_rate": 3e-3},
    }}).environment("dev", base=root)
    store = open_store(cfg.artifact_store.uri)
    manifest = ingest(store, cfg.data)
    started_here = not ray.is_initialized()
    yield cfg, store, manifest
    if started_here:
        ray.shutdown()


def _fit(env, run_id, **overrides):
    cfg, store, m = env
    if overrides:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update=overrides)})
    return fit(cfg, store, dataset=m.name, dataset_version=m.version, run_id=run_id)


def _losses(env, run_id) -> list[float]:
    return [s["loss"] for s in read_steps(env[1], run_id)]


def _accuracy(env, result) -> float:
    _, store, m = env
    model, spec = load_bundle(store.local_path(result.bundle_key))
    x, y = load_dataset(store, m.name, m.version).test()
    return evaluate_model(model, x, y, num_classes=len(spec.classes)).accuracy


@pytest.fixture(scope="module")
def ddp(env):
    result = _fit(env, "ddp")
    return result, _losses(env, "ddp")


def test_fsdp_follows_ddp_step_by_step_across_a_worker_death_and_checkpoints_a_full_model(env, ddp, tmp_path):
    """A worker dies in the last epoch; the group restarts from a checkpoint: the
    sharded model and optimizer state went through the (full, gathered) checkpoint and
    came back into the shards, so the losses still follow DDP's."""
    ddp_result, ddp_losses = ddp
    cfg, store, m = env
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"strategy": "fsdp"})})
    fault = FaultInjection(epoch=EPOCHS - 1, marker_dir=str(tmp_path / "markers"), rank=1)
    result = fit(cfg, store, dataset=m.name, dataset_version=m.version, run_id="fsdp", fault=fault)
    assert result.epochs == EPOCHS
    # Ray commits a reported checkpoint asynchronously, so the restart is from epoch 2 or
    # (when the worker died before the commit) epoch 1; never from scratch.
    assert len(result.attempts) == 2 and result.attempts[1]["start_epoch"] in (EPOCHS - 2, EPOCHS - 1)
    losses = _losses(env, "fsdp")
    assert len(losses) == len(ddp_losses) == EPOCHS * 8
    assert losses == pytest.approx(ddp_losses, rel=1e-3, abs=1e-4)
    assert losses[-1] < losses[0] * 0.5
    # The bundle is built from FSDP's gathered full state dict: it loads into the plain
    # model and scores like the DDP-trained one.
    assert _accuracy(env, result) == pytest.approx(_accuracy(env, ddp_result), abs=0.02)


@pytest.fixture(scope="module")
def fp16_hook(env):
    """One run serves two tests: the fp16 hook, profiled (the profiler does not change numerics)."""
    return _fit(env, "fp16-hook", grad_compression="fp16", profile=True)


def test_fp16_compression_hook_changes_gradients_slightly(env, ddp, fp16_hook):
    _, ddp_losses = ddp
    result = fp16_hook
    losses = _losses(env, "fp16-hook")
    assert losses[0] == pytest.approx(ddp_losses[0], abs=1e-6)  # same weights before the first update
    assert losses == pytest.approx(ddp_losses, rel=0.05, abs=0.01)
    assert losses != ddp_losses, "fp16 hook left every loss bit-identical: it did not run"
    assert _accuracy(env, result) > 0.85


def test_powersgd_hook_matches_ddp_during_warmup_then_compresses(env, ddp):
    _, ddp_losses = ddp
    result = _fit(env, "powersgd", grad_compression="powersgd")
    losses = _losses(env, "powersgd")
    warm = POWERSGD_START
    assert losses[:warm] == pytest.approx(ddp_losses[:warm], rel=1e-5, abs=1e-6)
    later = [abs(a - b) for a, b in zip(losses[warm + 1 :], ddp_losses[warm + 1 :])]
    assert max(later) > 1e-4, "losses after warm-up equal DDP's: PowerSGD did not compress"
    assert losses[-1] < losses[0] * 0.6
    assert _accuracy(env, result) > 0.8


def test_profile_leaves_a_chrome_trace_of_training_steps(env, fp16_hook):
    _, store, _ = env
    trace = json.loads(store.get_text("runs/fp16-hook/train/profile-rank0.json"))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("ProfilerStep#") for n in names)
    assert any(n.startswith("aten::conv2d") or n.startswith("aten::convolution") for n in names)
    assert any("backward" in n.lower() for n in names)
