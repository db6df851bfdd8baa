"""Ray Train runs with real worker deaths: recovery, exhausted retries, resume, corrupt checkpoints.

Four short runs on 2 CPU workers share one Ray runtime and one dataset (400 digits rows,
4 epochs, a checkpoint per epoch). The fault-free run is the reference the others must
reproduce: every piece of training state is checkpointed, so a recovered or resumed run
repeats the reference's per-epoch losses, not merely its ballpark.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kubeml.artifacts import open_store
from kubeml.bundle import load_bundle
from kubeml.config import KubemlConfig
from kubeml.data import ingest, load_dataset
from kubeml.evaluation import evaluate_model
from kubeml.training.checkpoint import MODEL_FILE
from kubeml.training.fit import FaultInjection, TrainingFailed, fit

pytestmark = pytest.mark.slow

EPOCHS = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("ft")
    cfg = KubemlConfig(environments={"dev": {
        "data": {"max_rows": 400, "seed": 3},
        "training": {"epochs": EPOCHS, "workers": 2, "batch_size": 32, "checkpoint_every_epochs": 1,
                     "keep_checkpoints": 2, "learning_rate": 3e-3},
    }}).environment("dev", base=root)
    store = open_store(cfg.artifact_store.uri)
    manifest = ingest(store, cfg.data)
    started_here = not ray.is_initialized()
    yield root, cfg, store, manifest
    if started_here:
        ray.shutdown()


def _fit(env, run_id, **kwargs):
    _, cfg, store, m = env
    overrides = kwargs.pop("training", {})
    if overrides:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update=overrides)})
    return fit(cfg, store, dataset=m.name, dataset_version=m.version, run_id=run_id, **kwargs)


def _test_accuracy(env, result) -> float:
    _, _, store, m = env
    model, spec = load_bundle(store.local_path(result.bundle_key))
    x, y = load_dataset(store, m.name, m.version).test()
    return evaluate_model(model, x, y, num_classes=len(spec.classes)).accuracy


def _losses(result):
    return [(h["epoch"], round(h["loss"], 5), round(h["val_loss"], 5)) for h in result.history]


@pytest.fixture(scope="module")
def reference(env):
    result = _fit(env, "reference")
    return result, _test_accuracy(env, result)


def test_fault_free_run_trains_and_keeps_best_checkpoints(env, reference):
    result, accuracy = reference
    assert result.epochs == EPOCHS and len(result.history) == EPOCHS
    assert accuracy > 0.8
    assert result.time_to_first_step_s > 0
    kept = sorted(p.name for p in Path(result.checkpoint_uri[len("file://"):]).parent.iterdir() if p.is_dir())
    assert len(kept) <= 3  # best 2 by val_loss, plus the latest


def test_killed_worker_is_replaced_and_the_run_resumes_from_the_last_checkpoint(env, reference, tmp_path):
    ref, ref_accuracy = reference
    # Rank 1's process dies (os._exit) during the third epoch, after checkpoints for epochs 1 and 2.
    fault = FaultInjection(epoch=2, rank=1, marker_dir=str(tmp_path / "markers"), times=1, mode="exit")

    result = _fit(env, "killed-worker", fault=fault, training={"max_failures": 1})

    assert len(list((tmp_path / "markers").iterdir())) == 1
    # Ray commits a reported checkpoint asynchronously: a worker dying right after the
    # epoch-2 report may leave epoch 1 as the last committed one. Either way, not from scratch.
    assert len(result.attempts) == 2 and result.attempts[1]["start_epoch"] in (1, 2)
    assert result.epochs == EPOCHS
    assert abs(_test_accuracy(env, result) - ref_accuracy) <= 0.005
    assert _losses(result) == _losses(ref)


def _alive_workers() -> list[dict]:
    """Training worker actors still alive (each holds a CPU and a torch process group)."""
    from ray._private import state

    return [a for a in state.actors().values()
            if a.get("State") == "ALIVE" and a.get("ActorClassName") == "RayTrainWorker"]


def test_more_failures_than_allowed_fail_cleanly_then_resume_skips_a_truncated_checkpoint(env, reference, tmp_path):
    import ray

    ref, _ = reference
    _, _, store, _ = env
    fault = FaultInjection(epoch=2, rank=0, marker_dir=str(tmp_path / "markers"), times=5, mode="raise")

    with pytest.raises(TrainingFailed, match=r"(?s)max_failures=0.*kubeml train --resume interrupted"):
        _fit(env, "interrupted", fault=fault, training={"max_failures": 0})

    # No leaked workers: every CPU is free again and no training worker is left alive.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] or _alive_workers()
    ):
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert _alive_workers() == []

    # The newest checkpoint is cut short, as by a node dying mid-upload.
    run_dir = store.local_path("checkpoints/interrupted")
    latest = max((p for p in run_dir.iterdir() if p.name.startswith("epoch-")), key=lambda p: p.name)
    assert latest.name.startswith("epoch-000002")
    weights = latest / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    result = _fit(env, "interrupted", resume=True)

    assert result.attempts[-1]["skipped_corrupt"] == [latest.name]
    assert result.attempts[-1]["start_epoch"] == 1
    assert _losses(result) == _losses(ref)


def test_a_dataset_version_not_in_the_store_fails_before_any_worker_starts(tmp_path):
    """Deterministic, so never retried: the error names the version and the store, and no
    checkpoint, run spec or Ray runtime is made for it."""
    import ray

    from kubeml.errors import ArtifactNotFound

    cfg = KubemlConfig(environments={"dev": {"training": {"epochs": 1, "workers": 1}}}).environment("dev", base=tmp_path)
    store = open_store(cfg.artifact_store.uri)
    was_running = ray.is_initialized()
    started = time.monotonic()
    with pytest.raises(ArtifactNotFound, match=r"dataset digits@no-such-version is not in file://"):
        fit(cfg, store, dataset="digits", dataset_version="no-such-version", run_id="missing-data")
    assert time.monotonic() - started < 10
    assert ray.is_initialized() == was_running
    assert store.list("checkpoints/missing-data/") == [] and store.list("runs/missing-data/") == []
