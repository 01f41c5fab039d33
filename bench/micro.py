"""Micro-benchmarks behind the lever predictions in docs/performance.md (one thread, process CPU time).

GELU variants, attention implementations and the GEMM shapes of a paper-size step, the cost of drawing
one batch of prompts, and the optimizer step. Each figure is the median of `reps` timings after a warm-up.

    python -m bench.micro [--reps 7] [--parts gelu_ms attention_ms attention_chunks_ms attention_compiled_ms
        gemm_gflops prompts optimizer_ms] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl_core.families import Linear, sample_prompts

BT = 64 * 81  # tokens of a batch of 64 prompts of 41 points


def ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return round(statistics.median(times) * 1e3, 3)


C1 = 2 * math.sqrt(2 / math.pi)  # tanh-GELU = x * sigmoid(C1 * (x + 0.044715 x^3))
C2 = C1 * 0.044715


def gelu_row(width: int, variants: dict[str, Callable], reps: int) -> dict:
    x = torch.randn(BT, width, requires_grad=True)
    g = torch.randn(BT, width)
    row = {}
    for name, fn in variants.items():
        def fwd_bwd(fn=fn):
            x.grad = None
            fn(x).backward(g)

        row[name] = {"fwd_ms": ms(lambda fn=fn: fn(x.detach()), reps), "fwd_bwd_ms": ms(fwd_bwd, reps)}
    for name, fn in (("tanh", torch.tanh), ("exp", torch.exp), ("add", lambda t: t + t)):
        row[f"elementwise {name}"] = {"fwd_ms": ms(lambda fn=fn: fn(x.detach()), reps)}
    return row


def gelu(reps: int) -> dict:
    compiled = torch.compile(lambda t: F.gelu(t, approximate="tanh"))
    variants = {
        "tanh, ATen (ours)": lambda t: F.gelu(t, approximate="tanh"),
        "erf": F.gelu,
        "sigmoid form, autograd": lambda t: t * torch.sigmoid(t * (C1 + C2 * t * t)),
        "tanh, torch.compile": compiled,
    }
    # the MLP hidden width at small and paper size
    return {f"{BT}x{width}": gelu_row(width, variants, reps) for width in (256, 1024)}


class BmmAttention(torch.autograd.Function):
    """Causal attention as baddbmm + softmax + bmm with a hand-written backward."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        scale = q.shape[-1] ** -0.5
        p = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale), -1)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return torch.bmm(p, v)

    @staticmethod
    def backward(ctx, go):
        q, k, v, p = ctx.saved_tensors
        dv = torch.bmm(p.transpose(1, 2), go)
        ds = torch._softmax_backward_data(torch.bmm(go, v.transpose(1, 2)), p, -1, p.dtype)
        return torch.bmm(ds, k).mul_(ctx.scale), torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale), dv, None


def attention_row(heads: int, hd: int, reps: int) -> dict:
    B, T = 64, 81
    q, k, v = (torch.randn(B, heads, T, hd, requires_grad=True) for _ in range(3))
    g = torch.randn(B, heads, T, hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    bias = torch.full((T, T), float("-inf")).triu(1)
    flat = [t.detach().reshape(B * heads, T, hd).requires_grad_() for t in (q, k, v)]

    def run(fn):
        def go():
            for t in (q, k, v, *flat):
                t.grad = None
            fn().backward(g)

        return go

    def math_backend():
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def explicit():
        att = (q @ k.transpose(-2, -1)) * hd**-0.5
        return att.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    def flash_forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    row = {
        "flash (ours), fwd+bwd ms": ms(run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), reps),
        "math backend": ms(run(math_backend), reps),
        "explicit bmm + softmax": ms(run(explicit), reps),
        "custom bmm Function": ms(run(lambda: BmmAttention.apply(*flat, bias).view(B, heads, T, hd)), reps),
        "flash forward only": ms(flash_forward, reps),
    }
    return row


def attention(reps: int) -> dict:
    return {f"B=64 H={h} T=81 hd={hd}": attention_row(h, hd, reps) for h, hd in ((4, 16), (8, 32))}


class ChunkedCausalAttention(torch.autograd.Function):
    """Causal attention on the fused (B, T, 3C) q/k/v as baddbmm + softmax + bmm over query chunks: rows a..b-1
    attend to keys 0..b-1 only, so the masked upper triangle is computed only inside each chunk's own block."""

    @staticmethod
    def forward(ctx, qkv, heads: int, bounds: tuple[int, ...]):
        B, T, C3 = qkv.shape
        hd = C3 // 3 // heads
        h = qkv.view(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4).reshape(3, B * heads, T, hd)
        q, k, v = h[0], h[1], h[2]
        scale = hd**-0.5
        o = torch.empty(B * heads, T, hd, dtype=qkv.dtype)
        ps = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            masked = torch.ones(b - a, b, dtype=torch.bool).triu(a + 1)  # key j > query a + i
            bias = torch.zeros(b - a, b, dtype=qkv.dtype).masked_fill_(masked, float("-inf"))
            p = torch.softmax(torch.baddbmm(bias, q[:, a:b], k[:, :b].transpose(1, 2), alpha=scale), -1)
            o[:, a:b] = torch.bmm(p, v[:, :b])
            ps.append(p)
        ctx.save_for_backward(h, o, *ps)
        ctx.dims = (B, T, heads, hd, scale, bounds)
        return o.view(B, heads, T, hd).transpose(1, 2).reshape(B, T, heads * hd)

    @staticmethod
    def backward(ctx, g):
        h, o, *ps = ctx.saved_tensors
        B, T, heads, hd, scale, bounds = ctx.dims
        q, k, v = h[0], h[1], h[2]
        do = g.view(B, T, heads, hd).transpose(1, 2).reshape(B * heads, T, hd)
        rowdot = (do * o).sum(-1, keepdim=True)  # sum_j dP_ij P_ij = dO_i . O_i
        dh = torch.zeros(3, B * heads, T, hd, dtype=g.dtype)
        for (a, b), p in zip(zip(bounds[:-1], bounds[1:]), ps):
            ds = torch.bmm(do[:, a:b], v[:, :b].transpose(1, 2)).sub_(rowdot[:, a:b]).mul_(p)
            dh[0, :, a:b].baddbmm_(ds, k[:, :b], alpha=scale)
            dh[1, :, :b].baddbmm_(ds.transpose(1, 2), q[:, a:b], alpha=scale)
            dh[2, :, :b].baddbmm_(p.transpose(1, 2), do[:, a:b])
        return dh.view(3, B, heads, T, hd).permute(1, 3, 0, 2, 4).reshape(B, T, 3 * heads * hd), None, None


def sdpa_on_fused(qkv: torch.Tensor, heads: int, chunk: int | None = None) -> torch.Tensor:
    """The model's attention on the fused q/k/v (views, SDPA, the (B, T, C) output); with `chunk`, SDPA on two
    query chunks, the second with a boolean mask over all keys."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in qkv.split(C, dim=2))
    if chunk is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        top = F.scaled_dot_product_attention(q[:, :, :chunk], k[:, :, :chunk], v[:, :, :chunk], is_causal=True)
        mask = torch.ones(T - chunk, T, dtype=torch.bool).tril(chunk)
        y = torch.cat([top, F.scaled_dot_product_attention(q[:, :, chunk:], k, v, attn_mask=mask)], dim=2)
    return y.transpose(1, 2).reshape(B, T, C)


def attention_chunks_row(B: int, heads: int, hd: int, reps: int) -> dict:
    T, C = 81, heads * hd
    qkv = torch.randn(B, T, 3 * C, requires_grad=True)
    g = torch.randn(B, T, C)

    def no_mask() -> torch.Tensor:
        q, k, v = (t.view(B, T, heads, hd).transpose(1, 2) for t in qkv.split(C, dim=2))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)

    variants = {
        "sdpa causal (ours)": lambda: sdpa_on_fused(qkv, heads),
        "sdpa, no mask (not causal)": no_mask,
        "sdpa, 2 query chunks (41 + 40)": lambda: sdpa_on_fused(qkv, heads, chunk=41),
    }
    for bounds in ((0, 81), (0, 41, 81), (0, 27, 54, 81), (0, 21, 41, 61, 81)):
        variants[f"explicit, {len(bounds) - 1} chunk(s)"] = lambda b=bounds: ChunkedCausalAttention.apply(qkv, heads, b)
    return time_on_fused(qkv, heads, g, variants, reps, unchecked=(no_mask,))


def time_on_fused(qkv: torch.Tensor, heads: int, g: torch.Tensor, variants: dict[str, Callable[[], torch.Tensor]],
                  reps: int, unchecked: tuple = ()) -> dict:
    """Forward + backward ms of each attention variant on `qkv`, each but `unchecked` first checked against SDPA."""
    ref = sdpa_on_fused(qkv, heads)
    row = {}
    for name, fn in variants.items():
        if fn not in unchecked:
            torch.testing.assert_close(fn(), ref, atol=1e-5, rtol=1e-5)

        def fwd_bwd(fn=fn):
            qkv.grad = None
            fn().backward(g)

        row[name] = ms(fwd_bwd, reps)
    return row


def attention_chunks(reps: int) -> dict:
    """Forward + backward of causal attention on one `batch_threads: 2` shard (32 prompts, T = 81), from the fused
    q/k/v to the (B, T, C) output: SDPA with and without the causal mask (does flash skip masked keys?), and
    query chunks that skip them (SDPA per chunk; the explicit ChunkedCausalAttention)."""
    return {f"B=32 H={h} T=81 hd={hd}, fwd+bwd ms": attention_chunks_row(32, h, hd, reps)
            for h, hd in ((4, 16), (8, 32))}


def explicit_on_fused(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The model's attention written out (scores, causal mask, softmax, weighted values) for inductor to fuse."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in qkv.split(C, dim=2))
    s = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)


def flex_backward_on_cpu() -> str:
    """Whether FlexAttention, whose compiled CPU forward skips masked blocks, can train on CPU in this torch."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = torch.randn(1, 1, 81, 16, requires_grad=True)
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 81, 81, device="cpu")
    try:
        torch.compile(flex_attention)(q, q, q, block_mask=mask).sum().backward()
    except NotImplementedError as e:
        return f"no: {e}"
    return "yes"


def attention_compiled_row(B: int, heads: int, hd: int, reps: int) -> dict:
    T, C = 81, heads * hd
    qkv = torch.randn(B, T, 3 * C, requires_grad=True)
    g = torch.randn(B, T, C)
    variants = {
        "sdpa causal (ours)": lambda: sdpa_on_fused(qkv, heads),
        "explicit, eager": lambda: explicit_on_fused(qkv, heads),
        "explicit, torch.compile": torch.compile(lambda: explicit_on_fused(qkv, heads)),
        "explicit, torch.compile max-autotune (CPP GEMM template)": torch.compile(
            lambda: explicit_on_fused(qkv, heads),
            options={"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}),
    }
    return time_on_fused(qkv, heads, g, variants, reps)


def attention_compiled(reps: int) -> dict:
    """Can inductor beat SDPA in pure PyTorch? Forward + backward on one `batch_threads: 2` shard
    (32 prompts, T = 81), from the fused q/k/v to the (B, T, C) output: SDPA against the attention written out
    and compiled, and whether FlexAttention trains on CPU at all."""
    out: dict = {f"B=32 H={h} T=81 hd={hd}, fwd+bwd ms": attention_compiled_row(32, h, hd, reps)
                 for h, hd in ((4, 16), (8, 32))}
    out["flex_attention backward on CPU"] = flex_backward_on_cpu()
    return out


def gemms(reps: int) -> dict:
    """GFLOP/s of the matmuls in a paper-size step (forward, input grad, weight grad), and a 1024^3 square."""
    shapes = {
        "square 1024": (1024, 1024, 1024, ""),
        "fwd c_attn": (BT, 256, 768, "Bt"), "fwd attn.c_proj": (BT, 256, 256, "Bt"),
        "fwd c_fc": (BT, 256, 1024, "Bt"), "fwd mlp.c_proj": (BT, 1024, 256, "Bt"),
        "dX c_attn": (BT, 768, 256, ""), "dX c_fc": (BT, 1024, 256, ""), "dX mlp.c_proj": (BT, 256, 1024, ""),
        "dW c_attn": (768, BT, 256, "At"), "dW c_fc": (1024, BT, 256, "At"),
        "dW mlp.c_proj": (256, BT, 1024, "At"), "dW attn.c_proj": (256, BT, 256, "At"),
    }
    out = {}
    for name, (m, k, n, tr) in shapes.items():
        a = torch.randn(k, m).t() if tr == "At" else torch.randn(m, k)
        b = torch.randn(n, k).t() if tr == "Bt" else torch.randn(k, n)
        out[f"{name} {m}x{k}x{n}"] = round(2 * m * k * n / ms(lambda a=a, b=b: torch.mm(a, b), reps) / 1e6, 1)
    return out


def prompts(reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"sample_prompts(linear, 64, 41, 20) ms": ms(lambda: sample_prompts(Linear(), 64, 41, 20, gen), reps * 10)}


def optimizer(reps: int) -> dict:
    """The work after the shards of a `batch_threads: 2` step, which runs on one thread: summing two gradients
    (into new tensors, as before 2026-12-01, and in place), clipping, and AdamW (foreach, the CPU default before
    2026-12-01, and fused), at small and paper size."""
    from icl_core.config import TrainConfig
    from icl_core.model import ICLTransformer, ModelConfig
    from icl_core.train import build_optimizer

    out = {}
    for size, (layers, heads, width) in {"small": (4, 4, 64), "paper": (12, 8, 256)}.items():
        model = ICLTransformer(ModelConfig(n_layer=layers, n_head=heads, n_embd=width))
        params = list(model.parameters())
        shards = [[torch.randn_like(p) * 1e-3 for p in params] for _ in range(2)]
        row = {"sum two gradients, new tensors": ms(lambda s=shards: [a + b for a, b in zip(*s)], reps),
               "sum two gradients, in place (ThreadedStep)": ms(lambda s=shards: [a.add_(b) for a, b in zip(*s)], reps)}
        for p, g in zip(params, shards[0]):
            p.grad = g.clone()
        row["clip_grad_norm_"] = ms(lambda ps=params: torch.nn.utils.clip_grad_norm_(ps, 1.0), reps)
        row["AdamW foreach"] = ms(torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True).step, reps)
        row["AdamW fused (build_optimizer)"] = ms(build_optimizer(model, TrainConfig(), torch.device("cpu")).step, reps)
        out[f"{size} ({sum(p.numel() for p in params) / 1e6:.2f} M parameters)"] = row
    return out


PARTS = {"gelu_ms": gelu, "attention_ms": attention, "attention_chunks_ms": attention_chunks,
         "attention_compiled_ms": attention_compiled, "gemm_gflops": gemms, "prompts": prompts,
         "optimizer_ms": optimizer}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which micro-benchmarks")
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "micro.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    res = {"threads": 1, "date": time.strftime("%Y-%m-%d"), **{k: PARTS[k](a.reps) for k in a.parts}}
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
