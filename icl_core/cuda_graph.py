"""The whole training step (forward, MSE, backward, clip, AdamW) replayed from one CUDA graph.

A paper-size model is launch-bound on a modern GPU: eager training kept an H200 at 2.6 % of its matmul rate,
and the same kernels replayed from a graph ran 2.7x faster (docs/performance.md#gpu). `train.cuda_graph: true`
uses this step on CUDA; it computes what the eager step computes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import ICLTransformer


def capturable_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Give every param group its own learning-rate tensor on `device`, which a captured step reads."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


class GraphedStep:
    """`step(xs, ys, lr)` -> the loss tensor of that step; one graph, captured again when the prompt shape changes.

    The optimizer must be fused/capturable AdamW with tensor learning rates (`build_optimizer(capturable=True)`).
    Capture needs warm-up iterations; they run on a copy of the weights' and optimizer's values, which are put
    back before the first real step, so the run is the one eager training would make.
    """

    def __init__(self, model: ICLTransformer, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.params = list(model.parameters())
        self.device = self.params[0].device
        self.shape: tuple[int, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # no cache under capture
            pred = self.model(self.xs, self.ys)
        self.loss = (pred.float() - self.ys).square().mean()
        self.loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()

    def _capture(self, xs: Tensor, ys: Tensor) -> None:
        self.graph = None  # free the previous shape's graph and its memory first
        torch.cuda.synchronize(self.device)
        self.xs, self.ys = xs.clone(), ys.clone()
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                       for p, s in self.optimizer.state.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._body()
        torch.cuda.synchronize(self.device)
        # Capture ran nothing, but the warm-up steps did: put the weights and optimizer state back.
        with torch.no_grad():
            for p, saved in zip(self.params, saved_params):
                p.copy_(saved)
            for p, state in self.optimizer.state.items():
                before = saved_state.get(p, {})  # empty when the warm-up created the state: fresh is zeros
                for k, v in state.items():
                    if torch.is_tensor(v):
                        if k in before:
                            v.copy_(before[k])
                        else:
                            v.zero_()
        self.shape = tuple(xs.shape)

    def __call__(self, xs: Tensor, ys: Tensor, lr: float) -> Tensor:
        if tuple(xs.shape) != self.shape:
            self._capture(xs, ys)
        self.xs.copy_(xs)
        self.ys.copy_(ys)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        self.graph.replay()
        return self.loss

    def __enter__(self) -> GraphedStep:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
