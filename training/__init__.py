"""kubeml.training: distributed training on Ray Train, locally or as a cluster job.

Where it sits: the training half of kubeml, between the data (:mod:`kubeml.data`) and the
model bundle (:mod:`kubeml.bundle`) the evaluate and register stages read.

- :mod:`.fit`: the driver, :func:`fit` (one run; resumable, fault tolerant) and its result;
- :mod:`.worker`: the loop every Ray Train worker runs;
- :mod:`.loop`: the training step in plain PyTorch; :mod:`.checkpoint`: verified checkpoints;
- :mod:`.launchers`: where a run happens (``training.target``: local, kuberay, sagemaker);
- :mod:`.tune`: hyperparameter search; :mod:`.cli`: ``kubeml train`` / ``kubeml tune``.

The names below are loaded on first use: importing them eagerly would pull in torch, Ray
and the artifact stores, and ``kubeml --help`` imports this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CheckpointCorrupt",
    "FaultInjection",
    "Launcher",
    "RBAC_RULES",
    "Stepper",
    "TrainOutcome",
    "TrainResult",
    "TrainState",
    "TrainingFailed",
    "TuneOptions",
    "TuneResult",
    "WorkerState",
    "fit",
    "get_launcher",
    "load_checkpoint",
    "read_progress",
    "read_steps",
    "run_tune",
    "save_checkpoint",
    "train_loop_per_worker",
    "verify_checkpoint",
]

#: Public name -> the module that defines it (imported by ``__getattr__`` on first access).
_HOMES = {
    "CheckpointCorrupt": "kubeml.errors",
    "FaultInjection": "kubeml.training.fit",
    "Launcher": "kubeml.training.launchers",
    "RBAC_RULES": "kubeml.training.launchers",
    "Stepper": "kubeml.training.loop",
    "TrainOutcome": "kubeml.training.launchers",
    "TrainResult": "kubeml.training.fit",
    "TrainState": "kubeml.training.checkpoint",
    "TrainingFailed": "kubeml.errors",
    "TuneOptions": "kubeml.training.tune",
    "TuneResult": "kubeml.training.tune",
    "WorkerState": "kubeml.training.worker",
    "fit": "kubeml.training.fit",
    "get_launcher": "kubeml.training.launchers",
    "load_checkpoint": "kubeml.training.checkpoint",
    "read_progress": "kubeml.training.fit",
    "read_steps": "kubeml.training.fit",
    "run_tune": "kubeml.training.tune",
    "save_checkpoint": "kubeml.training.checkpoint",
    "train_loop_per_worker": "kubeml.training.worker",
    "verify_checkpoint": "kubeml.training.checkpoint",
}

if TYPE_CHECKING:
    from kubeml.errors import CheckpointCorrupt, TrainingFailed
    from kubeml.training.checkpoint import TrainState, load_checkpoint, save_checkpoint, verify_checkpoint
    from kubeml.training.fit import FaultInjection, TrainResult, fit, read_progress, read_steps
    from kubeml.training.launchers import RBAC_RULES, Launcher, TrainOutcome, get_launcher
    from kubeml.training.loop import Stepper
    from kubeml.training.tune import TuneOptions, TuneResult, run_tune
    from kubeml.training.worker import WorkerState, train_loop_per_worker


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
