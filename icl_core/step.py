"""The training step, one signature for its three forms: `step(xs, ys, lr)` -> the loss tensor of that step.

`make_step` picks the form once from the config: a step replayed from a CUDA graph (`train.cuda_graph` on CUDA),
the batch split over threads (`train.batch_threads` on CPU), or the eager step. Each is a context manager: enter it
before the first step, leave it after the last (the threaded step sets and restores torch's thread count there).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor

from .config import TrainConfig
from .cuda_graph import GraphedStep
from .threaded_step import ThreadedStep


class TrainStep(Protocol):
    def __call__(self, xs: Tensor, ys: Tensor, lr: float) -> Tensor: ...

    def __enter__(self) -> TrainStep: ...

    def __exit__(self, *exc: object) -> None: ...


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EagerStep:
    """Forward (bf16 autocast on CUDA; compiled with `compile`), MSE against ys, backward, clip, optimizer step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 compile: bool = False):
        self.optimizer, self.grad_clip = optimizer, grad_clip
        self.forward = torch.compile(model) if compile else model
        self.params = list(model.parameters())
        cuda = self.params[0].device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def __call__(self, xs: Tensor, ys: Tensor, lr: float) -> Tensor:
        set_lr(self.optimizer, lr)
        with self.autocast:
            pred = self.forward(xs, ys)
        loss = (pred.float() - ys).square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss

    def __enter__(self) -> EagerStep:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
              device: torch.device) -> TrainStep:
    """The step `cfg` asks for on `device` (on CPU a graphed config trains eagerly; on CUDA a threaded one as one
    batch)."""
    if cfg.cuda_graph and device.type == "cuda":
        return GraphedStep(model, optimizer, cfg.grad_clip)
    if cfg.batch_threads > 1 and device.type == "cpu":
        return ThreadedStep(model, optimizer, cfg.grad_clip, cfg.batch_threads)
    return EagerStep(model, optimizer, cfg.grad_clip, compile=cfg.compile)
