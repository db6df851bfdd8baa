"""The training step in plain PyTorch: accumulation, precision, clipping, schedule, RNG."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

from kubeml.errors import ConfigError
from kubeml.training.loop import (
    Stepper,
    capture_rng,
    evaluate,
    make_optimizer,
    make_scheduler,
    restore_rng,
    windows,
)
from kubeml.models import available_models, build_model

CPU = torch.device("cpu")


def _digits(n: int = 600):
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.data[:n].astype(np.float32)), torch.from_numpy(d.target[:n].astype(np.int64))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [2, 4])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(k):
    n = 4 * k
    x, y = _digits(n)
    torch.manual_seed(0)
    # No dropout and no batch norm: those make micro-batches differ from one big batch by design.
    a = build_model("mlp", hidden=[32], dropout=0.0)
    b = copy.deepcopy(a)
    sa = Stepper(a, make_optimizer(a, learning_rate=1e-2, weight_decay=1e-4), precision="fp32", device=CPU,
                 grad_clip_norm=1.0)
    sb = Stepper(b, make_optimizer(b, learning_rate=1e-2, weight_decay=1e-4), precision="fp32", device=CPU,
                 grad_clip_norm=1.0)
    # Unequal micro-batch sizes (5, 3, 5, 3, ...) exercise the per-sample weighting.
    sizes = [5 if i % 2 == 0 else 3 for i in range(k)]
    cuts = np.cumsum([0, *sizes])
    micro = [(x[s:e], y[s:e]) for s, e in zip(cuts, cuts[1:])]
    for _ in range(3):
        ma = sa.step(micro)
        mb = sb.step([(x, y)])
        torch.testing.assert_close(ma.loss, mb.loss, rtol=1e-5, atol=1e-6)
        assert ma.samples == mb.samples == n
        torch.testing.assert_close(ma.grad_norm, mb.grad_norm, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(_params(a), _params(b)):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_windows_groups_batches_and_keeps_the_remainder():
    assert list(windows(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(windows([], 2)) == []


def _train(precision: str, epochs: int = 10) -> tuple[float, float]:
    x, y = _digits(1500)
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[64], dropout=0.0)
    opt = make_optimizer(model, learning_rate=1e-2, weight_decay=1e-4)
    steps = epochs * (1200 // 50)
    sched = make_scheduler(opt, kind="warmup_cosine", total_steps=steps, warmup_fraction=0.1, min_lr_ratio=0.0)
    stepper = Stepper(model, opt, precision=precision, device=CPU, scheduler=sched, grad_clip_norm=5.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(1200, generator=g)
        for i in range(0, 1200, 50):
            idx = perm[i : i + 50]
            stepper.step([(x[idx], y[idx])])
    return evaluate(model, x[1200:], y[1200:], device=CPU, autocast=stepper.autocast())


def test_bf16_autocast_on_cpu_converges_like_fp32():
    loss16, acc16 = _train("bf16")
    loss32, acc32 = _train("fp32")
    assert acc16 >= 0.9, (loss16, acc16)
    assert acc16 >= acc32 - 0.03, (acc16, acc32)


def test_fp16_on_cpu_is_refused_with_the_fix():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="use precision: bf16 on CPU"):
        Stepper(model, make_optimizer(model, learning_rate=0.1, weight_decay=0), precision="fp16", device=CPU)


def test_clipping_bounds_the_update_and_reports_the_unclipped_norm():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.mul_(100)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _params(model)
    m = Stepper(model, opt, precision="fp32", device=CPU, grad_clip_norm=0.01).step(
        [(torch.randn(16, 4) * 100, torch.zeros(16, dtype=torch.long))])
    assert m.grad_norm > 0.01
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(_params(model), before)))
    assert float(moved) == pytest.approx(0.01, rel=1e-3)  # SGD lr 1: the step is the clipped gradient


def test_warmup_cosine_rises_linearly_then_decays_to_the_floor():
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    sched = make_scheduler(opt, kind="warmup_cosine", total_steps=100, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert sched.state_dict()["lr_lambdas"][0] is not None  # plain data, checkpointable


def test_rng_capture_and_restore_replays_every_generator():
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


@pytest.mark.parametrize("name", ["digits_cnn", "mlp", "resnet"])
def test_every_registered_model_takes_flat_digit_rows(name):
    assert name in available_models()
    model = build_model(name).eval()
    assert model(torch.rand(3, 64) * 16).shape == (3, 10)


def test_resnet_takes_rgb_images_when_configured():
    model = build_model("resnet", in_channels=3, image_size=32, widths=[8, 16], blocks=2, pixel_max=1.0).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="widths"):
        build_model("resnet", widths=[])
