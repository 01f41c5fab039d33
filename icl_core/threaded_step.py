"""The CPU training step with the batch split over threads: each thread runs forward and backward on one shard.

At the small sizes CPU sweeps train, our ops are too short for OpenMP to split well, while a shard keeps a core
busy on GEMMs of half the batch; see docs/performance.md#two-cores for the figures. `train.batch_threads: k`
uses this step on CPU.
The loss is the batch mean (each shard adds its squared errors over the batch's element count) and the
gradients are summed in shard order, so a run is deterministic and resumes bit-identically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

from .model import ICLTransformer


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Each op on the thread that calls it (torch.set_num_threads(1)); the setting is put back after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sum_into(total: Tensor, grad: Tensor) -> Tensor:
    """total + grad, in place when total is a gradient buffer of its own (a paper-size step saves ~12 ms)."""
    if total.is_contiguous() and not total._is_view():  # never write through a view or an expanded tensor
        return total.add_(grad)
    return total + grad


class ThreadedStep:
    """`step(xs, ys, lr)` -> the loss tensor: `threads` shards of the batch, forward and backward each on its own
    thread (the caller's is one), gradients summed, then clip and the optimizer step.

    Run it inside `with step:` (or `single_threaded_ops()`), so no shard's ops spread over the other shards'
    cores; leaving the block, or `close()`, ends the worker threads.
    """

    def __init__(self, model: ICLTransformer, optimizer: torch.optim.Optimizer, grad_clip: float, threads: int):
        if threads < 2:
            raise ValueError(f"threads must be at least 2, got {threads}")
        self.model, self.optimizer, self.grad_clip, self.threads = model, optimizer, grad_clip, threads
        self.params = list(model.parameters())
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="iclmix-shard",
                                       initializer=torch.set_num_threads, initargs=(1,))

    def _shard(self, xs: Tensor, ys: Tensor, count: int) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """This shard's part of the batch-mean loss, and its gradients."""
        loss = (self.model(xs, ys) - ys).square().sum() / count
        return loss.detach(), torch.autograd.grad(loss, self.params, allow_unused=True)

    def __call__(self, xs: Tensor, ys: Tensor, lr: float) -> Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        shards = list(zip(xs.tensor_split(self.threads), ys.tensor_split(self.threads)))
        shards = [(x, y) for x, y in shards if len(x)]  # a batch smaller than `threads` leaves some empty
        count = ys.numel()
        futures = [self.pool.submit(self._shard, x, y, count) for x, y in shards[1:]]
        try:
            first = self._shard(*shards[0], count)
        finally:
            wait(futures)  # never leave a shard running against weights the next step changes
        results = [first, *(f.result() for f in futures)]
        loss = results[0][0]
        for other, _ in results[1:]:
            loss = loss + other
        for i, p in enumerate(self.params):
            total = None
            for _, grads in results:
                if grads[i] is not None:
                    total = grads[i] if total is None else _sum_into(total, grads[i])
            p.grad = total
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def __enter__(self) -> ThreadedStep:
        self._ops = single_threaded_ops()
        self._ops.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._ops.__exit__(None, None, None)
        finally:
            self.close()
