"""The training paths that only exist on a GPU: fp16 with a gradient scaler, and FSDP on CUDA.

Run on a machine with a CUDA device (``pytest -m gpu tests/gpu``); without one these
tests are deselected (``tests/gpu/conftest.py``). The data is synthetic but learnable:
labels are the argmax of a fixed random projection of the inputs, so a model that learns
drives the loss to well under two thirds of its start.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kubeml.training.loop import Stepper, make_optimizer, make_scheduler
from kubeml.models import build_model

pytestmark = pytest.mark.gpu

STEPS = 150


def _batches(device: torch.device, n: int = STEPS, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    projection = torch.randn(64, 10, generator=g)
    for _ in range(n):
        x = torch.rand(batch, 64, generator=g) * 16
        y = (x @ projection).argmax(1)
        yield x.to(device), y.to(device)


def _train(model: torch.nn.Module, precision: str, device: torch.device) -> tuple[list[float], Stepper]:
    opt = make_optimizer(model, learning_rate=3e-3, weight_decay=0.0)
    sched = make_scheduler(opt, kind="warmup_cosine", total_steps=STEPS, warmup_fraction=0.1, min_lr_ratio=0.1)
    stepper = Stepper(model, opt, precision=precision, device=device, scheduler=sched, grad_clip_norm=1.0)
    losses = [stepper.step([b]).loss for b in _batches(device)]
    return losses, stepper


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_fp16_with_gradient_scaler_trains_and_keeps_a_finite_scale():
    device = torch.device("cuda")
    torch.manual_seed(0)
    losses, stepper = _train(build_model("digits_cnn").to(device), "fp16", device)
    assert stepper.scaler is not None
    scale = stepper.scaler.get_scale()
    assert 1.0 <= scale < float("inf")
    assert all(loss == loss for loss in losses)  # no NaN reached the reported loss
    assert _mean(losses[-20:]) < 0.6 * _mean(losses[:20])


def test_bf16_on_cuda_trains_like_fp32():
    device = torch.device("cuda")
    torch.manual_seed(0)
    fp32, _ = _train(build_model("digits_cnn").to(device), "fp32", device)
    torch.manual_seed(0)
    bf16, _ = _train(build_model("digits_cnn").to(device), "bf16", device)
    assert _mean(bf16[-20:]) < 0.6 * _mean(bf16[:20])
    assert _mean(bf16[-20:]) == pytest.approx(_mean(fp32[-20:]), rel=0.25, abs=0.05)


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    torch.cuda.set_device(0)
    yield
    dist.destroy_process_group()


def test_fsdp_fully_shard_on_cuda_trains_and_round_trips_its_full_state(process_group):
    from torch.distributed.tensor import DTensor

    from kubeml.training.worker import _load_states, _model_state, _optim_state, _shard_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = _shard_model(build_model("digits_cnn"), device)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    losses, stepper = _train(model, "bf16", device)
    assert _mean(losses[-20:]) < 0.6 * _mean(losses[:20])

    # The gathered full state loads into a plain model and into a fresh sharded one, and
    # both then answer exactly as the trained sharded model does.
    state = SimpleNamespace(model=_model_state(model), optimizer=_optim_state(model, stepper.optimizer))
    assert all(t.device.type == "cpu" and not isinstance(t, DTensor) for t in state.model.values())
    plain = build_model("digits_cnn")
    plain.load_state_dict(state.model)
    torch.manual_seed(1)
    resharded = _shard_model(build_model("digits_cnn"), device)
    opt = make_optimizer(resharded, learning_rate=3e-3, weight_decay=0.0)
    # As in the worker: the scheduler is attached (it adds initial_lr to the param groups)
    # before the checkpoint is loaded.
    make_scheduler(opt, kind="warmup_cosine", total_steps=STEPS, warmup_fraction=0.1, min_lr_ratio=0.1)
    _load_states(resharded, opt, state)
    assert opt.state_dict()["state"], "optimizer moments were not restored"
    x, _ = next(_batches(device, n=1, seed=7))
    model.eval(), plain.eval(), resharded.eval()
    with torch.no_grad():
        expected = model(x).float().cpu()
        assert torch.allclose(plain(x.cpu()), expected, atol=1e-4)
        assert torch.allclose(resharded(x).float().cpu(), expected, atol=1e-5)
