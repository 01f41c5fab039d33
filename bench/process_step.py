"""Lever experiment (not adopted): icl_core.threaded_step's computation with one shard per process, not thread.

A shard process holds a replica of the model whose parameters are the trainer's own, in shared memory, so the
optimizer step in the trainer is seen by every shard. Each step the trainer writes the other shards' prompts into
shared buffers, runs its own shard, and sums the shards' gradients (written into shared buffers) in shard order:
same shards, same sum order, same single-threaded ops, so the parameters after any number of steps are
bit-identical to ThreadedStep's (tests/test_bench.py). Processes share no allocator, address space or GIL, and
each may run torch.compile, which threads may not; the gain on two cores is within the noise
(docs/performance.md, "Levers").
"""

from __future__ import annotations

import math
import multiprocessing.connection
import traceback
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from icl_core.threaded_step import _sum_into


def _shard_loss_and_grads(model: nn.Module, params: list[Tensor], xs: Tensor, ys: Tensor, count: int
                          ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """One shard's part of the batch-mean loss (its squared errors over the batch's element count), and its
    gradients: the same function ThreadedStep runs on each thread."""
    loss = (model(xs, ys) - ys).square().sum() / count
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def _worker(build: Callable[[], nn.Module], compile: bool, params: list[Tensor], grads: list[Tensor], xs_buf: Tensor,
            ys_buf: Tensor, conn: multiprocessing.connection.Connection) -> None:
    """A shard process: build the replica, point its parameters at the shared ones, then answer steps."""
    torch.set_num_threads(1)
    try:
        model = build()
        mine = list(model.parameters())
        if [p.shape for p in mine] != [p.shape for p in params]:
            raise ValueError("the replica's parameters do not match the trainer's")
        for p, shared in zip(mine, params):
            p.data = shared
        model.train()
        forward = torch.compile(model) if compile else model
        conn.send(("ready",))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the trainer is gone
            return
        if msg is None:
            return
        try:
            shape, count = msg
            b, n, d = shape
            xs = xs_buf[: b * n * d].view(b, n, d)
            ys = ys_buf[: b * n].view(b, n)
            loss, shard_grads = _shard_loss_and_grads(forward, mine, xs, ys, count)
            used = []
            for g, out in zip(shard_grads, grads):
                used.append(g is not None)
                if g is not None:
                    out.copy_(g)
            conn.send(("done", loss.item(), used))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class ProcessStep:
    """`step(xs, ys)` -> the loss tensor: `processes` shards of the batch, forward and backward each in its own
    process (the caller's is one), gradients summed in shard order, then clip and the optimizer step.

    `build()` must return a fresh model of the trainer's architecture and be picklable (a module-level function
    or a functools.partial of one): the shard processes are spawned, not forked. Run the step inside
    `single_threaded_ops()`. `close()` ends the shard processes.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, processes: int,
                 build: Callable[[], nn.Module], max_batch: int, max_points: int, dim: int, compile: bool = False):
        if processes < 2:
            raise ValueError(f"processes must be at least 2, got {processes}")
        self.model, self.optimizer, self.grad_clip, self.processes = model, optimizer, grad_clip, processes
        self.params = list(model.parameters())
        self.forward = torch.compile(model) if compile else model
        model.share_memory()  # in place: the optimizer's references stay valid, and its updates reach every shard
        shard = math.ceil(max_batch / processes)
        self.max_shard = (shard, max_points, dim)
        ctx = mp.get_context("spawn")
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list = []
        self.grads: list[list[Tensor]] = []
        self.bufs: list[tuple[Tensor, Tensor]] = []
        try:
            for _ in range(processes - 1):
                grads = [torch.zeros_like(p).share_memory_() for p in self.params]
                bufs = (torch.empty(shard * max_points * dim).share_memory_(),
                        torch.empty(shard * max_points).share_memory_())
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(build, compile, self.params, grads, *bufs, theirs),
                                   daemon=True, name="iclmix-shard")
                proc.start()
                theirs.close()
                self.conns.append(mine)
                self.procs.append(proc)
                self.grads.append(grads)
                self.bufs.append(bufs)
            for conn in self.conns:
                self._answer(conn, "ready")
        except BaseException:
            self.close()
            raise

    def _answer(self, conn: multiprocessing.connection.Connection, want: str) -> tuple:
        try:
            msg = conn.recv()
        except EOFError:
            raise RuntimeError("a shard process died (its traceback, if any, is on stderr)") from None
        if msg[0] == "error":
            raise RuntimeError(f"a shard process failed:\n{msg[1]}")
        assert msg[0] == want, msg
        return msg

    def __call__(self, xs: Tensor, ys: Tensor) -> Tensor:
        shards = list(zip(xs.tensor_split(self.processes), ys.tensor_split(self.processes)))
        count = ys.numel()
        b, n, d = xs.shape
        if b > self.max_shard[0] * self.processes or n > self.max_shard[1] or d != self.max_shard[2]:
            raise ValueError(f"prompts of shape {tuple(xs.shape)} exceed the shard buffers {self.max_shard}")
        sent = []
        for (x, y), conn, (xs_buf, ys_buf) in zip(shards[1:], self.conns, self.bufs):
            if len(x):  # a batch smaller than `processes` leaves some shards empty
                xs_buf[: x.numel()].view_as(x).copy_(x)
                ys_buf[: y.numel()].view_as(y).copy_(y)
                try:
                    conn.send((tuple(x.shape), count))
                except OSError:  # BrokenPipeError: the process is gone
                    raise RuntimeError("a shard process died (its traceback, if any, is on stderr)") from None
            sent.append(bool(len(x)))
        try:
            loss, first = _shard_loss_and_grads(self.forward, self.params, *shards[0], count)
        finally:
            answers = [self._answer(conn, "done") if s else None for conn, s in zip(self.conns, sent)]
        for i, p in enumerate(self.params):
            total = first[i]
            for answer, grads in zip(answers, self.grads):
                if answer is not None and answer[2][i]:
                    total = grads[i].clone() if total is None else _sum_into(total, grads[i])
            p.grad = total
        for answer in answers:
            if answer is not None:
                loss = loss + torch.tensor(answer[1], dtype=loss.dtype)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
