"""The in-context learner: a GPT-2 decoder over the prompt x1, y1, x2, y2, ..., xn (nanoGPT style).

Token layout (`layout`): Garg et al.'s "garg", x_i as a d-vector and y_i as the d-vector (y_i, 0, ..., 0); or
"y_channel" (Hoogland et al. 2024, Raventós et al. 2023), tokens of d + 1 coordinates with y in its own channel:
x_i as (0, x_i), y_i as (y_i, 0, ..., 0). One shared linear read-in; a linear read-out at every x position
predicts y_i from x_1, y_1, ..., x_i. The last y is never fed (nothing reads it), so a prompt of n points is
2n - 1 tokens and every parameter is used. Likewise the last block's y positions only serve as keys and values:
its queries, c_proj and MLP run at the x positions only (docs/performance.md: faster training, the same function).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelConfig:
    dim: int = 20  # input dimension d
    max_points: int = 41  # longest prompt (n points -> 2n - 1 tokens)
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    layout: Literal["garg", "y_channel"] = "garg"  # where y enters the token (module docstring)

    def __post_init__(self) -> None:
        if self.layout not in ("garg", "y_channel"):
            raise ValueError(f"layout must be 'garg' or 'y_channel', got {self.layout!r}")

    @property
    def token_dim(self) -> int:
        return self.dim + (self.layout == "y_channel")

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, x_only: bool = False) -> Tensor:
        """Causal self-attention; with `x_only`, outputs at the x positions (even tokens) only."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        mask = None
        if x_only:
            q = q[:, ::2]
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[::2]
        q, k, v = (t.view(B, t.shape[1], self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.c_proj(y.transpose(1, 2).reshape(B, q.shape[2], C))


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU (`gelu_new`, Garg et al.'s): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, x_only: bool = False) -> Tensor:
        a = self.attn(self.ln_1(x), x_only)
        x = (x[:, ::2] if x_only else x) + a
        return x + self.mlp(self.ln_2(x))


def interleave(xs: Tensor, ys: Tensor, layout: str) -> Tensor:
    """(B, n, d), (B, n) -> (B, 2n - 1, token_dim): x1, (y1, 0, ..), x2, ..., xn; with y_channel x_i is (0, x_i)."""
    if layout == "y_channel":
        xs = F.pad(xs, (1, 0))
    B, n, d = xs.shape
    ys_wide = torch.zeros_like(xs)
    ys_wide[:, :, 0] = ys
    return torch.stack((xs, ys_wide), dim=2).reshape(B, 2 * n, d)[:, :-1]


class ICLTransformer(nn.Module):
    """GPT-2 decoder with a linear read-in of (x | y) tokens and a scalar read-out at x positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.read_in = nn.Linear(cfg.token_dim, cfg.n_embd)
        self.wpe = nn.Embedding(2 * cfg.max_points - 1, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.read_out = nn.Linear(cfg.n_embd, 1)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def interleave(self, xs: Tensor, ys: Tensor) -> Tensor:
        """(B, n, d), (B, n) -> (B, 2n - 1, token_dim): the prompt's tokens in this model's layout."""
        return interleave(xs, ys, self.cfg.layout)

    def forward(self, xs: Tensor, ys: Tensor) -> Tensor:
        """Predictions (B, n): entry i uses x_1, y_1, ..., x_i only."""
        n = xs.shape[1]
        if n > self.cfg.max_points:
            raise ValueError(f"prompt of {n} points exceeds the model's max_points={self.cfg.max_points}")
        tokens = interleave(xs, ys, self.cfg.layout)
        pos = torch.arange(tokens.shape[1], device=xs.device)
        h = self.read_in(tokens) + self.wpe(pos)
        for i, block in enumerate(self.blocks):
            h = block(h, x_only=i == len(self.blocks) - 1)  # only x positions are read out
        return self.read_out(self.ln_f(h)).squeeze(-1)

    @torch.no_grad()
    def predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        """The estimator interface shared with every baseline: a prediction at every position."""
        was_training = self.training
        self.eval()
        try:
            return self(xs.to(self.read_in.weight.dtype), ys.to(self.read_in.weight.dtype)).to(ys.dtype)
        finally:
            self.train(was_training)

    def flops_per_step(self, n_points: int, batch_size: int) -> float:
        """Model FLOPs of one training step (`step_flops` of this model's config)."""
        return step_flops(self.cfg, n_points, batch_size)


def step_flops(cfg: ModelConfig, n_points: int, batch_size: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), as in the PaLM/nanoGPT estimate.

    Counts what forward computes: T = 2n - 1 tokens through every block but the last, whose q, k, v run
    at all T tokens and the rest at the n x positions; causal attention does half the T x T work.
    """
    n, T = n_points, 2 * n_points - 1
    C, L = cfg.n_embd, cfg.n_layer
    linear = (L - 1) * 12 * C * C * T + 3 * C * C * T + 9 * C * C * n + cfg.token_dim * C * T + C * n
    attention = (L - 1) * 2 * T * T * C + 2 * n * T * C
    return 3.0 * (2 * linear + attention) * batch_size


class BundledTransformer(nn.Module):
    """K ICLTransformers of one config as one model: each parameter stacked on a leading member axis.

    The same function as each member alone, computed for all at once: every linear layer is one batched matmul
    over the members and attention runs over the merged member x batch axis, so K members cost about the kernels
    of one. Member k's weights are `stacked(name)[k]` for each name of ICLTransformer's state dict; all of them
    are views into one (K, P) tensor `flat`, row k member k's, so that clipping and the optimizer are a few
    whole-tensor ops rather than a dozen per parameter (on a GPU, a kernel launch each).
    """

    def __init__(self, members: list[ICLTransformer]):
        super().__init__()
        self.cfg = members[0].cfg
        if any(m.cfg != self.cfg for m in members):
            raise ValueError("the members of a bundle share one model config")
        self.size = len(members)
        states = [m.state_dict() for m in members]
        self.names = list(states[0])
        self.flat = torch.cat([torch.stack([s[n].detach().reshape(-1) for s in states]) for n in self.names], 1)
        self.spans: dict[str, tuple[int, int]] = {}  # name -> its columns of `flat`
        start = 0
        for name in self.names:
            shape, end = states[0][name].shape, start + states[0][name].numel()
            self.spans[name] = (start, end)
            self.register_parameter(_slot(name), nn.Parameter(self.flat[:, start:end].view(self.size, *shape)))
            start = end

    def _apply(self, fn, recurse=True):
        # .to(), .float() and the like would give each parameter its own storage, cutting it from `flat`
        raise NotImplementedError("a bundle stays where its members were built: build them on the device")

    def stacked(self, name: str) -> nn.Parameter:
        """The member-stacked tensor of ICLTransformer's parameter `name`."""
        return getattr(self, _slot(name))

    def flat_grad(self) -> Tensor:
        """Every member's gradients as one (K, P) tensor laid out as `flat` (zeros where a parameter has none)."""
        grads = [self.stacked(n).grad for n in self.names]
        return torch.cat([torch.zeros_like(self.stacked(n)).flatten(1) if g is None else g.flatten(1)
                          for n, g in zip(self.names, grads, strict=True)], 1)

    def member_state(self, k: int) -> dict[str, Tensor]:
        """Member k's weights as ICLTransformer's state dict."""
        return {name: self.stacked(name)[k].detach().clone() for name in self.names}

    @torch.no_grad()
    def load_member(self, k: int, state: dict[str, Tensor]) -> None:
        for name in self.names:
            self.stacked(name)[k].copy_(state[name])

    def forward(self, xs: Tensor, ys: Tensor) -> Tensor:
        """(K, B, n, d), (K, B, n) -> predictions (K, B, n), member k's from member k's prompts and weights."""
        K, B, n = ys.shape
        if K != self.size:
            raise ValueError(f"{K} prompt sets for a bundle of {self.size}")
        if n > self.cfg.max_points:
            raise ValueError(f"prompt of {n} points exceeds the model's max_points={self.cfg.max_points}")
        w = self.stacked
        tokens = interleave(xs.flatten(0, 1), ys.flatten(0, 1), self.cfg.layout)
        T = tokens.shape[1]
        h = _linear(tokens.reshape(K, B, T, -1), w("read_in.weight"), w("read_in.bias")) + w("wpe.weight")[:, None, :T]
        for i in range(self.cfg.n_layer):
            b = f"blocks.{i}."
            x_only = i == self.cfg.n_layer - 1  # only x positions are read out
            a = self._attention(_layer_norm(h, w(b + "ln_1.weight"), w(b + "ln_1.bias")), b + "attn.", x_only)
            h = (h[:, :, ::2] if x_only else h) + a
            m = _linear(_layer_norm(h, w(b + "ln_2.weight"), w(b + "ln_2.bias")), w(b + "mlp.c_fc.weight"),
                        w(b + "mlp.c_fc.bias"))
            h = h + _linear(gelu_tanh(m), w(b + "mlp.c_proj.weight"), w(b + "mlp.c_proj.bias"))
        h = _layer_norm(h, w("ln_f.weight"), w("ln_f.bias"))
        return _linear(h, w("read_out.weight"), w("read_out.bias")).squeeze(-1)

    def _attention(self, x: Tensor, prefix: str, x_only: bool) -> Tensor:
        """CausalSelfAttention.forward for every member, (K, B, T, C) -> (K, B, T or x positions, C)."""
        K, B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = _linear(x, self.stacked(prefix + "c_attn.weight"), self.stacked(prefix + "c_attn.bias")).split(C, -1)
        mask = None
        if x_only:
            q = q[:, :, ::2]
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[::2]
        q, k, v = (t.reshape(K * B, t.shape[2], H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(K, B, q.shape[2], C)
        return _linear(y, self.stacked(prefix + "c_proj.weight"), self.stacked(prefix + "c_proj.bias"))


def _slot(name: str) -> str:
    return name.replace(".", "__")  # module attribute names cannot hold dots


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Member-wise nn.Linear: x (K, ..., in), weight (K, out, in), bias (K, out) -> (K, ..., out)."""
    K, *rest, n_in = x.shape
    out = torch.baddbmm(bias.unsqueeze(1), x.reshape(K, -1, n_in), weight.transpose(1, 2))
    return out.view(K, *rest, weight.shape[1])


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Member-wise nn.LayerNorm over the last axis: x (K, B, T, C), weight and bias (K, C)."""
    y = F.layer_norm(x, x.shape[-1:], eps=1e-5)
    return torch.addcmul(bias[:, None, None], y, weight[:, None, None])
