"""Lever experiment: a hand-written CPU kernel for the model's causal attention (bench/attention_kernel.cpp), and
one for its GELU.

Same function as `F.scaled_dot_product_attention` (float32 rounding apart), for heads of 16, 32 or 64 dims:
forward and backward of one batch item at a time in L2, vector loops over keys (16 floats wide with AVX-512,
8 with AVX2), the flash-attention backward from the saved log-sum-exp. It reads the fused q/k/v projection as it
is and writes the (B, T, C) layout c_proj reads, so no transposes. Built on first use with the system C++ compiler
(g++, -O3 -march=native) into ~/.cache/iclmix-bench, loaded with ctypes, and registered as a torch custom op so
that torch.compile keeps it in one graph. The GELU is GPT-2's tanh form (icl_core.model.gelu_tanh) in one
vector pass forward and one backward. docs/performance.md ("Levers") has the figures.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from icl_core.model import MLP, CausalSelfAttention, ICLTransformer, gelu_tanh

SOURCE = Path(__file__).with_name("attention_kernel.cpp")
HEAD_DIMS = (16, 32, 64)


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel, built once per source version and machine."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("the attention kernel needs a C++ compiler (g++ or $CXX)")
    # -march=native: the build is only good for this CPU, so its flags are part of the key.
    flags = next((line for line in _cpuinfo().splitlines() if line.startswith("flags")), os.uname().machine)
    key = hashlib.sha256(SOURCE.read_bytes() + flags.encode() + compiler.encode()).hexdigest()[:16]
    out = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iclmix-bench" / f"attention-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
                       check=True, capture_output=True, text=True)
        tmp.replace(out)  # atomic: concurrent builders each write their own file
    lib = ctypes.CDLL(str(out))
    n, p = ctypes.c_long, ctypes.c_void_p
    lib.attn_forward.argtypes = [p, p, p, n, n, n, n, n, n]
    lib.attn_backward.argtypes = [p, p, p, p, p, n, n, n, n, n, n]
    lib.gelu_forward.argtypes = [p, p, p, n]
    lib.gelu_backward.argtypes = [p, p, p, p, n]
    lib.gelu_forward.restype = lib.gelu_backward.restype = None
    return lib


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"attention kernel {what}: " + ("unsupported head size" if rc == 1 else "out of memory"))


def _queries(T: int, q_stride: int) -> int:
    return (T - 1) // q_stride + 1


@torch.library.custom_op("iclmix_bench::causal_attention", mutates_args=())
def causal_attention(qkv: Tensor, n_head: int, q_stride: int) -> tuple[Tensor, Tensor]:
    """(B, T, 3C) fused q, k, v -> (B, TQ, C) output and (B, H, TQ) log-sum-exp; query i at position i * q_stride."""
    qkv = qkv.contiguous()
    B, T, C3 = qkv.shape
    TQ = _queries(T, q_stride)
    y, lse = qkv.new_empty(B, TQ, C3 // 3), qkv.new_empty(B, n_head, TQ)
    _check(library().attn_forward(qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), B, T, TQ, q_stride, C3 // 3, n_head),
           "forward")
    return y, lse


@causal_attention.register_fake
def _(qkv: Tensor, n_head: int, q_stride: int) -> tuple[Tensor, Tensor]:
    B, T, C3 = qkv.shape
    TQ = _queries(T, q_stride)
    return qkv.new_empty(B, TQ, C3 // 3), qkv.new_empty(B, n_head, TQ)


@torch.library.custom_op("iclmix_bench::causal_attention_backward", mutates_args=())
def causal_attention_backward(qkv: Tensor, y: Tensor, lse: Tensor, gy: Tensor, n_head: int, q_stride: int) -> Tensor:
    qkv, gy = qkv.contiguous(), gy.contiguous()
    B, T, C3 = qkv.shape
    g = torch.empty_like(qkv)
    _check(library().attn_backward(qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), gy.data_ptr(), g.data_ptr(),
                                   B, T, y.shape[1], q_stride, C3 // 3, n_head), "backward")
    return g


@causal_attention_backward.register_fake
def _(qkv: Tensor, y: Tensor, lse: Tensor, gy: Tensor, n_head: int, q_stride: int) -> Tensor:
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output) -> None:
    qkv, n_head, q_stride = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.n_head, ctx.q_stride = n_head, q_stride


def _backward(ctx, gy: Tensor, _glse: Tensor):
    qkv, y, lse = ctx.saved_tensors
    return causal_attention_backward(qkv, y, lse, gy, ctx.n_head, ctx.q_stride), None, None


causal_attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("iclmix_bench::gelu", mutates_args=())
def gelu(x: Tensor) -> tuple[Tensor, Tensor]:
    """GPT-2's tanh-GELU of a float32 CPU tensor in one pass, and sigmoid(2u) for its backward."""
    x = x.contiguous()
    y, s = torch.empty_like(x), torch.empty_like(x)
    library().gelu_forward(x.data_ptr(), y.data_ptr(), s.data_ptr(), x.numel())
    return y, s


@gelu.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("iclmix_bench::gelu_backward", mutates_args=())
def gelu_backward(x: Tensor, s: Tensor, gy: Tensor) -> Tensor:
    x, s, gy = x.contiguous(), s.contiguous(), gy.contiguous()
    gx = torch.empty_like(x)
    library().gelu_backward(x.data_ptr(), s.data_ptr(), gy.data_ptr(), gx.data_ptr(), x.numel())
    return gx


@gelu_backward.register_fake
def _(x: Tensor, s: Tensor, gy: Tensor) -> Tensor:
    return torch.empty_like(x)


def _gelu_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])


gelu.register_autograd(lambda ctx, gy, _gs: (gelu_backward(*ctx.saved_tensors, gy),),
                       setup_context=_gelu_setup_context)


class KernelMLP(MLP):
    """MLP with the kernel GELU on float32 CPU tensors (the model's gelu_tanh elsewhere)."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if h.device.type != "cpu" or h.dtype != torch.float32:
            return self.c_proj(gelu_tanh(h))
        return self.c_proj(gelu(h)[0])


class KernelAttention(CausalSelfAttention):
    """CausalSelfAttention with the kernel in place of SDPA on float32 CPU tensors (SDPA elsewhere)."""

    def forward(self, x: Tensor, x_only: bool = False) -> Tensor:
        C = x.shape[-1]
        if x.device.type != "cpu" or x.dtype != torch.float32 or C // self.n_head not in HEAD_DIMS:
            return super().forward(x, x_only)
        y, _ = causal_attention(self.c_attn(x), self.n_head, 2 if x_only else 1)
        return self.c_proj(y)


def use_kernel(model: ICLTransformer, attention: bool = True, mlp: bool = False) -> ICLTransformer:
    """Swap every block's attention for KernelAttention and/or its MLP for KernelMLP, in place (same weights, same
    function)."""
    for block in model.blocks:
        if attention:
            block.attn.__class__ = KernelAttention
        if mlp:
            block.mlp.__class__ = KernelMLP
    return model
