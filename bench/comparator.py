"""The comparator: Garg et al.'s model (dtsip/in-context-learning), a Hugging Face GPT2Model backbone.

Same read-in Linear(d, n_embd), read-out Linear(n_embd, 1) and token layout as `ICLTransformer`, except that
Garg's code feeds all 2n tokens (the last y included, though nothing reads it); predictions at the x
positions are the same. `load_into` copies its weights into an `ICLTransformer` (HF's Conv1D stores
weights transposed; wte is unused; wpe is truncated to 2n - 1 rows).

Needs `transformers` (the `bench` extra).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icl_core.model import ICLTransformer, ModelConfig


class HFGPT2Learner(nn.Module):
    """Garg et al.'s TransformerModel: read-in, GPT2Model(inputs_embeds=...), read-out at x positions."""

    def __init__(self, cfg: ModelConfig, attn_implementation: str | None = None):
        """`attn_implementation`: None = the transformers default (sdpa); "eager" = the 2022-era attention."""
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        if cfg.layout != "garg":
            raise ValueError("the comparator is Garg et al.'s model: layout 'garg' only")
        self.cfg = cfg
        hf_cfg = GPT2Config(
            n_positions=2 * cfg.max_points,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            **({} if attn_implementation is None else {"attn_implementation": attn_implementation}),
        )
        self.read_in = nn.Linear(cfg.dim, cfg.n_embd)
        self.backbone = GPT2Model(hf_cfg)
        self.read_out = nn.Linear(cfg.n_embd, 1)

    @staticmethod
    def combine(xs: Tensor, ys: Tensor) -> Tensor:
        """(B, n, d), (B, n) -> (B, 2n, d): x1, (y1,0..), ..., xn, (yn,0..) (Garg's `_combine`)."""
        B, n, d = xs.shape
        ys_wide = torch.cat((ys.view(B, n, 1), torch.zeros(B, n, d - 1, device=ys.device, dtype=ys.dtype)), dim=2)
        return torch.stack((xs, ys_wide), dim=2).view(B, 2 * n, d)

    def forward(self, xs: Tensor, ys: Tensor) -> Tensor:
        embeds = self.read_in(self.combine(xs, ys))
        out = self.backbone(inputs_embeds=embeds).last_hidden_state
        return self.read_out(out)[:, ::2, 0]


def load_into(src: HFGPT2Learner, dst: ICLTransformer) -> ICLTransformer:
    """Copy the comparator's weights into `dst` (same ModelConfig); returns `dst`."""
    if src.cfg != dst.cfg:
        raise ValueError(f"configs differ: {src.cfg} vs {dst.cfg}")
    hf = src.backbone.state_dict()
    state: dict[str, Tensor] = {
        "read_in.weight": src.read_in.weight,
        "read_in.bias": src.read_in.bias,
        "read_out.weight": src.read_out.weight,
        "read_out.bias": src.read_out.bias,
        "wpe.weight": hf["wpe.weight"][: dst.wpe.num_embeddings],
        "ln_f.weight": hf["ln_f.weight"],
        "ln_f.bias": hf["ln_f.bias"],
    }
    for i in range(dst.cfg.n_layer):
        for ours, theirs, conv in (
            ("ln_1", "ln_1", False),
            ("attn.c_attn", "attn.c_attn", True),
            ("attn.c_proj", "attn.c_proj", True),
            ("ln_2", "ln_2", False),
            ("mlp.c_fc", "mlp.c_fc", True),
            ("mlp.c_proj", "mlp.c_proj", True),
        ):
            w = hf[f"h.{i}.{theirs}.weight"]
            state[f"blocks.{i}.{ours}.weight"] = w.t() if conv else w  # Conv1D is (in, out); Linear is (out, in)
            state[f"blocks.{i}.{ours}.bias"] = hf[f"h.{i}.{theirs}.bias"]
    dst.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()}, strict=True)
    return dst
