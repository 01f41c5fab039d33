"""Many runs in one model: K run configs of one model shape trained together as a BundledTransformer.

Each member keeps what a solo run has: its seeded initial weights, its own data stream (mixture, generator,
noise), its own lr schedule and gradient clipping, and its own run directory with config.yaml, metrics.csv and a
checkpoint in the solo format (`load_model`, evaluation and a solo `--resume` read it like any run's). A member
trained in a bundle equals the same config trained alone up to float rounding. A member whose loss turns
non-finite is frozen (its weights and optimizer state stop changing, it writes nothing more) and reported; the
others go on.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, RunConfig, config_hash, dump_yaml
from .errors import NonFiniteLossError
from .families import sample_prompts
from .model import BundledTransformer
from .train import (
    CHECKPOINT,
    CONFIG,
    METRIC_FIELDS,
    METRICS,
    TrainCallback,
    TrainResult,
    _progress_bar,
    _resume,
    _save,
    _truncate_metrics,
    _write_error,
    atomic_write_text,
    build_model,
    build_optimizer,
    data_generator,
    lr_at,
    model_config,
    resolve_device,
)

# What the members of one bundle share; everything else (seed, mixture, noise, lr schedule, clipping) is theirs.
SHARED_TRAIN = ("steps", "batch_size", "weight_decay", "betas", "checkpoint_every", "log_every", "device")
SHARED_DATA = ("dim", "n_points", "curriculum")


def bundle_key(cfg: RunConfig) -> str:
    """Runs with equal keys can train as one bundle: the same model, prompt shapes at every step and step count."""
    full = cfg.to_dict()
    data, train = full["data"], full["train"]
    return config_hash({
        "model": model_config(cfg).to_dict(),
        "data": {k: data[k] for k in SHARED_DATA},
        "train": {k: train[k] for k in SHARED_TRAIN},
    })


class StackedAdamW:
    """torch's AdamW update on the bundle's (K, P) parameters, with a learning rate per member and frozen members.

    Decoupled weight decay applies to matrices only, as `build_optimizer` does for a solo run."""

    def __init__(self, model: BundledTransformer, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8):
        self.model, self.weight_decay, self.betas, self.eps = model, weight_decay, betas, eps
        flat = model.flat
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(flat), torch.zeros_like(flat)
        self.steps = torch.zeros(model.size, device=flat.device)
        self.decay = torch.cat([torch.full((b - a,), float(model.stacked(n).dim() >= 3), device=flat.device)
                                for n, (a, b) in model.spans.items()])  # 1 on a matrix's columns

    @torch.no_grad()
    def step(self, lr: Tensor, active: Tensor, grad: Tensor) -> None:
        """One update of every active member from `grad` (K, P); `lr` and `active` have one entry per member.
        Inactive members' rows of `grad` are zeroed (a frozen member's are not finite)."""
        b1, b2 = self.betas
        p, m, v = self.model.flat, self.exp_avg, self.exp_avg_sq
        on = active[:, None]
        grad.masked_fill_(~on, 0.0)
        self.steps += active
        t = self.steps.clamp(min=1.0)
        step_size = torch.where(active, lr / (1 - b1**t), 0.0)[:, None]
        bias2_sqrt = (1 - b2**t).sqrt()[:, None]
        if self.weight_decay:
            p.mul_(1 - (torch.where(active, lr, 0.0) * self.weight_decay)[:, None] * self.decay)
        m.lerp_(grad, torch.where(on, 1 - b1, 0.0))
        v.mul_(torch.where(on, b2, 1.0)).addcmul_(grad, grad, value=1 - b2)  # inactive rows of grad are 0
        update = v.sqrt().div_(bias2_sqrt).add_(self.eps)  # one (K, P) temporary, reused
        p.sub_(torch.div(m, update, out=update).mul_(step_size))

    def member_state(self, k: int) -> dict[str, tuple[int, Tensor, Tensor]]:
        """Member k's (step, exp_avg, exp_avg_sq) per parameter name."""
        s, out = int(self.steps[k]), {}
        for n, (a, b) in self.model.spans.items():
            shape = self.model.stacked(n).shape[1:]
            out[n] = (s, self.exp_avg[k, a:b].view(shape).clone(), self.exp_avg_sq[k, a:b].view(shape).clone())
        return out

    @torch.no_grad()
    def load_member(self, k: int, state: dict[str, tuple[int, Tensor, Tensor]]) -> None:
        for n, (s, m, v) in state.items():
            a, b = self.model.spans[n]
            self.steps[k] = s
            self.exp_avg[k, a:b].copy_(m.reshape(-1))
            self.exp_avg_sq[k, a:b].copy_(v.reshape(-1))


@torch.no_grad()
def clip_per_member(grad: Tensor, max_norm: Tensor) -> None:
    """clip_grad_norm_ for each member (row of `grad`, K x P) over its own gradients; a max_norm of 0 leaves that
    member unclipped."""
    coef = (max_norm / (grad.square().sum(1).sqrt() + 1e-6)).clamp(max=1.0)
    grad.mul_(torch.where(max_norm > 0, coef, 1.0)[:, None])


def _solo_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple]:
    """A solo run's Adam state by parameter name (step 0 and zeros where it has none yet)."""
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        out[name] = (int(st["step"]) if "step" in st else 0,
                     st.get("exp_avg", torch.zeros_like(p)), st.get("exp_avg_sq", torch.zeros_like(p)))
    return out


def _set_solo_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                              state: dict[str, tuple]) -> None:
    for name, p in model.named_parameters():
        s, m, v = state[name]
        optimizer.state[p] = {"step": torch.tensor(float(s), device=p.device), "exp_avg": m, "exp_avg_sq": v}


def train_bundle(
    cfgs: Sequence[RunConfig],
    out_dirs: Sequence[str | Path],
    *,
    resume: bool = False,
    callbacks: Sequence[Sequence[TrainCallback]] | None = None,
    progress: bool = True,
    extras: Sequence[dict[str, Any]] | None = None,
    on_checkpoint: Callable[[int, dict[str, float]], None] | None = None,
) -> list[TrainResult | NonFiniteLossError]:
    """Train `cfgs` as one bundle, member k into `out_dirs[k]`; per member its TrainResult, or the
    NonFiniteLossError that froze it. Members resumed at different steps (a kill between their saves) start
    together: the ones ahead wait, unchanged and drawing no prompts, until the others reach their step.

    `callbacks[k]` follow member k; `on_checkpoint(step, {"loss": mean over the active members})` runs once per
    checkpoint step, after every active member saved."""
    K = len(cfgs)
    if K == 0 or len(out_dirs) != K:
        raise ValueError("a bundle needs one output directory per config, and at least one config")
    if len({bundle_key(c) for c in cfgs}) > 1:
        raise ConfigError("bundle", f"its members differ in model, data.{'/'.join(SHARED_DATA)} or "
                                    f"train.{'/'.join(SHARED_TRAIN)}; only runs of one shape train as one bundle")
    callbacks = callbacks or [() for _ in cfgs]
    extras = [dict(e) for e in (extras or [{} for _ in cfgs])]
    outs = [Path(o) for o in out_dirs]
    tc = cfgs[0].train  # its shared fields are every member's
    device = resolve_device(tc.device)

    members = [build_model(c).to(device) for c in cfgs]
    optimizers = [build_optimizer(m, c.train, device) for m, c in zip(members, cfgs, strict=True)]
    gens = [data_generator(c.seed, device) for c in cfgs]
    starts, lasts = [0] * K, [{} for _ in cfgs]
    for k, (cfg, out) in enumerate(zip(cfgs, outs, strict=True)):
        path = out / CHECKPOINT
        if path.exists() and not resume:
            raise ConfigError("--out", f"{out} already holds a run; pass --resume to continue it or pick a new dir")
        if path.exists():
            starts[k], saved, lasts[k] = _resume(path, cfg, members[k], optimizers[k], gens[k], device, False)
            extras[k] = {**saved, **extras[k]}
    for cfg, out, begin in zip(cfgs, outs, starts, strict=True):
        out.mkdir(parents=True, exist_ok=True)
        with _write_error("--out", out / CONFIG):
            atomic_write_text(out / CONFIG, dump_yaml(cfg))
        _truncate_metrics(out / METRICS, begin)

    model = BundledTransformer(members)
    optimizer = StackedAdamW(model, tc.weight_decay, tc.betas)
    for k in range(K):
        optimizer.load_member(k, _solo_optimizer_state(optimizers[k], members[k]))
        optimizers[k].state.clear()  # the stacked state is the live one: a solo copy would double Adam's memory
    families = [c.data.family for c in cfgs]
    clip = torch.tensor([c.train.grad_clip for c in cfgs], device=device)
    active = torch.ones(K, dtype=torch.bool, device=device)  # not frozen
    begins = torch.tensor(starts, device=device)
    first_bad = torch.zeros(K, dtype=torch.long, device=device)
    bad_loss = torch.zeros(K, device=device)
    errors: dict[int, NonFiniteLossError] = {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    step = min(starts)
    start = time.perf_counter()
    bar = _progress_bar(tc.steps, step, progress)
    data = cfgs[0].data
    with contextlib.ExitStack() as files:
        handles = [files.enter_context(open(o / METRICS, "a", newline="")) for o in outs]
        writers = [csv.DictWriter(h, fieldnames=METRIC_FIELDS) for h in handles]
        while step < tc.steps and len(errors) < K:
            lr = [lr_at(step, c.train) for c in cfgs]
            n_dims, n_points = data.dims_at(step), data.points_at(step)
            waiting = ((torch.zeros(tc.batch_size, n_points, data.dim, device=device),
                        torch.zeros(tc.batch_size, n_points, device=device)) if step < max(starts) else None)
            prompts = [sample_prompts(f, tc.batch_size, n_points, data.dim, g, c.data.noise_std, n_dims)
                       if begin <= step else waiting  # a member ahead keeps its data stream for its own step
                       for f, g, c, begin in zip(families, gens, cfgs, starts, strict=True)]
            xs, ys = torch.stack([p[0] for p in prompts]), torch.stack([p[1] for p in prompts])
            running = active & (begins <= step)
            with autocast:
                pred = model(xs, ys)
            losses = (pred.float() - ys).square().mean(dim=(1, 2))
            losses.sum().backward()
            grad = model.flat_grad()
            model.zero_grad(set_to_none=True)  # the per-parameter grads are in `grad` now: free them
            finite = torch.isfinite(losses.detach())
            first_bad = torch.where(running & ~finite, step + 1, first_bad)
            bad_loss = torch.where(running & ~finite, losses.detach(), bad_loss)
            active &= finite | ~running
            clip_per_member(grad, clip)
            optimizer.step(torch.tensor(lr, device=device), running & finite, grad)
            del grad  # else it lives through the next step's forward and backward
            step += 1

            log_now = step % tc.log_every == 0 or step == 1 or step == tc.steps
            save_now = step % tc.checkpoint_every == 0 or step == tc.steps
            if log_now or save_now:
                trained = [k for k in range(K) if starts[k] < step]  # members that took this step
                for k in torch.nonzero(first_bad).flatten().tolist():
                    errors.setdefault(k, NonFiniteLossError(int(first_bad[k]), float(bad_loss[k])))
            if log_now:
                values = losses.tolist()
                for k in trained:
                    if k in errors:
                        continue
                    lasts[k] = {"loss": values[k], "lr": lr[k], "n_dims": n_dims, "n_points": n_points}
                    writers[k].writerow({"step": step, **lasts[k], "time_s": round(time.perf_counter() - start, 3)})
                    handles[k].flush()
                    for cb in callbacks[k]:
                        cb.on_log(step, lasts[k])
                shown = [values[k] for k in trained if k not in errors]
                if bar is not None and shown:
                    bar.set_postfix(loss=f"{sum(shown) / len(shown):.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if save_now:
                saved = [k for k in trained if k not in errors]
                for k in saved:
                    os.fsync(handles[k].fileno())  # rows up to the checkpoint must survive a kill
                    _save_member(model, optimizer, k, members[k], optimizers[k], gens[k], step, cfgs[k],
                                 outs[k], extras[k], lasts[k], callbacks[k])
                if on_checkpoint is not None and saved:
                    saved_losses = [lasts[k]["loss"] for k in saved if "loss" in lasts[k]]
                    on_checkpoint(step, {"loss": sum(saved_losses) / len(saved_losses)} if saved_losses else {})
            if log_now or save_now:  # where frozen members are known: skip the steps no live member takes
                alive = [k for k in range(K) if k not in errors]
                if alive and all(starts[k] >= step for k in alive):  # the live ones all wait ahead, or are done
                    ahead = min(min(starts[k] for k in alive), tc.steps)
                    if bar is not None:
                        bar.update(ahead - step)
                    step = ahead
    if bar is not None:
        bar.close()
    results: list[TrainResult | NonFiniteLossError] = []
    for k in range(K):
        if k in errors:
            results.append(errors[k])
            continue
        members[k].load_state_dict(model.member_state(k))
        results.append(TrainResult(members[k], cfgs[k], outs[k], step, lasts[k].get("loss", float("nan")), extras[k]))
    return results


def _save_member(model: BundledTransformer, optimizer: StackedAdamW, k: int, solo: torch.nn.Module,
                 solo_optimizer: torch.optim.Optimizer, gen: torch.Generator, step: int, cfg: RunConfig, out: Path,
                 extra: dict[str, Any], last: dict[str, float], callbacks: Sequence[TrainCallback]) -> None:
    """Member k's checkpoint in the solo format: its weights, its Adam state, its data generator."""
    solo.load_state_dict(model.member_state(k))
    _set_solo_optimizer_state(solo_optimizer, solo, optimizer.member_state(k))
    path = out / CHECKPOINT
    with _write_error("checkpoint", path):
        _save(out, solo, solo_optimizer, gen, step, cfg, extra, last)
    solo_optimizer.state.clear()  # written; kept, it would hold a second copy of the member's Adam state
    for cb in callbacks:
        cb.on_checkpoint(step, path, last)
