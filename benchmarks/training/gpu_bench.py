"""One-GPU benchmark (H100/H200): kubeml's training step vs a plain PyTorch loop, bf16.

Reference model: a GPT-style decoder (12 layers, d_model 1024, 16 heads, sequence 1024,
~150M parameters with the embedding) on random tokens. Both sides run the same model,
optimizer (AdamW, fused off for an equal footing) and batch:

- ``plain``: autocast(bf16) -> loss -> backward -> clip -> step -> zero_grad;
- ``kubeml``: :class:`kubeml.training.loop.Stepper` with precision bf16 and clipping.

Model FLOPs utilisation = (6 * params * tokens + 12 * layers * seq^2 * d_model * batch) per
second / the card's dense bf16 peak (989 TFLOP/s for H100 SXM and H200; 756 for H100 PCIe).
Prints one JSON object. Run: ``python benchmarks/training/gpu_bench.py [--steps 30]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0}


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=32000, d=1024, layers=12, heads=16, seq=1024):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(1, seq, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        return self.head(self.ln(self.blocks(self.emb(idx) + self.pos[:, : idx.shape[1]])))


class TokenLoss(nn.Module):
    def forward(self, logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _kubeml_stepper():
    """kubeml's Stepper; from the installed package, else straight from this checkout's training/loop.py
    (a GPU box may have PyTorch but not kubeml's other dependencies)."""
    try:
        from kubeml.training.loop import Stepper
    except ImportError:
        import importlib.util
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        sys.path.insert(0, str(root))
        spec = importlib.util.spec_from_file_location("kubeml_training_loop", root / "training" / "loop.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        Stepper = module.Stepper
    return Stepper


def _peak(name: str) -> float:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return float("nan")


def bench(kind: str, args, device) -> dict:
    torch.manual_seed(0)
    model = GPT(d=args.d_model, layers=args.layers, heads=args.heads, seq=args.seq).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=False)
    x = torch.randint(0, 32000, (args.batch, args.seq), device=device)
    y = torch.randint(0, 32000, (args.batch, args.seq), device=device)
    loss_fn = TokenLoss()
    if kind == "kubeml":
        Stepper = _kubeml_stepper()
        stepper = Stepper(model, opt, precision="bf16", device=device, grad_clip_norm=1.0, loss_fn=loss_fn)

        def step():
            stepper.step([(x, y)])
    else:
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    t_first = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t_first
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq
    flops = 6 * params * tokens + 12 * args.layers * args.seq**2 * args.d_model * args.batch
    del model, opt
    torch.cuda.empty_cache()
    return {"samples_per_s": args.batch / dt, "tokens_per_s": tokens / dt, "step_ms": dt * 1e3,
            "first_step_s": first, "params": params, "model_tflops_per_s": flops / dt / 1e12,
            "mfu": flops / dt / _peak(torch.cuda.get_device_name())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA GPU (H100/H200); none is visible")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    plain = bench("plain", args, device)
    kubeml = bench("kubeml", args, device)
    print(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "precision": "bf16",
        "model": f"GPT {args.layers}x{args.d_model}, seq {args.seq}, batch {args.batch}",
        "plain": plain, "kubeml": kubeml,
        "throughput_ratio": kubeml["samples_per_s"] / plain["samples_per_s"],
        "peak_bf16_tflops": _peak(torch.cuda.get_device_name()) / 1e12,
    }, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))


if __name__ == "__main__":
    main()
