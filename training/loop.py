"""The training step and its parts, in plain PyTorch (no Ray).

The Ray Train worker loop (:mod:`kubeml.training.worker`), the Ray Tune trainable
(:mod:`kubeml.training.tune`) and the benchmarks all drive the same :class:`Stepper`, so
what is measured and tested is exactly what runs in production:

- mixed precision: ``bf16`` autocast on CPU or CUDA; ``fp16`` autocast with a
  ``GradScaler`` (CUDA only; asking for it on a CPU fails with the fix);
- gradient accumulation: one optimizer step per window of ``k`` micro-batches, each
  micro-batch loss weighted by its share of the window's samples, so a window equals one
  ``k``-times-larger batch; under DDP only the last micro-batch all-reduces (``no_sync``);
- gradient clipping of the global L2 norm (after unscaling under fp16);
- a warmup + cosine learning-rate schedule, stepped once per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kubeml.errors import ConfigError

__all__ = [
    "StepMetrics",
    "Stepper",
    "capture_rng",
    "evaluate",
    "make_optimizer",
    "make_scheduler",
    "restore_rng",
    "windows",
]


def make_optimizer(model: nn.Module, *, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; ``foreach=False`` keeps the update order fixed, so resumed runs match bit for bit."""
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay, foreach=False)


class _WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine to ``floor`` at ``total``.

    A callable object (not a closure) so ``LambdaLR.state_dict()`` stays plain data.
    """

    def __init__(self, total: int, warmup: int, floor: float):
        self.total, self.warmup, self.floor = max(1, total), warmup, floor

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int, warmup_fraction: float, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    if kind != "warmup_cosine":
        raise ConfigError(f"unknown lr_schedule {kind!r}; allowed values: warmup_cosine, constant")
    warmup = int(round(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(total_steps, warmup, min_lr_ratio))


def windows(batches: Iterable[Any], k: int) -> Iterator[list[Any]]:
    """Group an iterable of batches into lists of ``k`` (the last may be shorter)."""
    window: list[Any] = []
    for b in batches:
        window.append(b)
        if len(window) == k:
            yield window
            window = []
    if window:
        yield window


@dataclass(frozen=True)
class StepMetrics:
    loss: float
    """Mean loss over the window's samples (this worker)."""
    samples: int
    correct: int
    """Correct top-1 predictions (classification outputs only; 0 for sequence outputs)."""
    grad_norm: float
    """Global gradient L2 norm before clipping; NaN when not clipping."""
    lr: float
    """Learning rate used for this step."""
    step_s: float
    skipped: bool = False
    """True when the fp16 scaler found inf/NaN gradients and skipped the update."""


class Stepper:
    """One optimizer step over a window of micro-batches.

    >>> model = nn.Linear(4, 3)
    >>> opt = make_optimizer(model, learning_rate=1e-2, weight_decay=0.0)
    >>> s = Stepper(model, opt, precision="fp32", device=torch.device("cpu"))
    >>> m = s.step([(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
    >>> m.samples
    8
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        precision: str,
        device: torch.device,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        grad_clip_norm: float | None = None,
        loss_fn: nn.Module | None = None,
    ):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown precision {precision!r}; allowed values: fp32, bf16, fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"precision fp16 needs a CUDA device (GradScaler is CUDA-only) but training runs on {device.type}; "
                "use precision: bf16 on CPU, or set use_gpu: true on a GPU node"
            )
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision, self.device, self.grad_clip_norm = precision, device, grad_clip_norm
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        if sync:
            yield
        elif hasattr(self.model, "no_sync"):  # DDP
            with self.model.no_sync():
                yield
        elif hasattr(self.model, "set_requires_gradient_sync"):  # FSDP (fully_shard)
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def step(self, window: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepMetrics:
        t0 = time.perf_counter()
        total = sum(len(y) for _, y in window)
        lr = float(self.optimizer.param_groups[0]["lr"])
        # Running sums stay on the device: one host sync per step, not one per micro-batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for i, (xb, yb) in enumerate(window):
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            last = i == len(window) - 1
            # Under DDP or FSDP, reduce gradients once per window (on the last backward), not per micro-batch.
            with self._gradient_sync(last):
                with self.autocast():
                    logits = self.model(xb)
                    loss = self.loss_fn(logits.float(), yb)
                # Weight by sample share: the window's gradient equals one batch of all its samples.
                scaled = loss * (len(yb) / total)
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_sum += loss.detach().double() * len(yb)
            if logits.dim() == 2:  # classification; for sequence outputs the argmax alone costs ~10 % of a step
                correct += (logits.detach().argmax(-1) == yb).sum()
        grad_norm = float("nan")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip_norm is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            # Under FSDP the gradients are sharded DTensors and so is the norm: the
            # reduction over shards gives the global norm every rank clips by.
            grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm.detach()
        skipped = False
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return StepMetrics(loss=float(loss_sum) / max(1, total), samples=total, correct=int(correct), grad_norm=float(grad_norm),
                           lr=lr, step_s=time.perf_counter() - t0, skipped=skipped)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, batch_size: int = 512,
             autocast: contextlib.AbstractContextManager | None = None) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``(x, y)``, in eval mode, restoring the mode after."""
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            with autocast or contextlib.nullcontext():
                logits = model(xb).float()
            loss += float(loss_fn(logits, yb))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    n = max(1, len(y))
    return loss / n, correct / n


def capture_rng() -> dict[str, Any]:
    """The generator states that influence training: python, numpy, torch CPU (and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))
