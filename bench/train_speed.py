"""Training speed on CPU: our training step against Garg et al.'s (HF GPT2Model), in one process, interleaved.

One step = fresh prompts from `sample_prompts` (dense linear, batch 64, 41 points, d = 20) + forward + MSE +
backward + clip + optimizer step. Ours is the step icl_core.train runs (fused AdamW, clip 1.0); the
comparator is Garg et al.'s (HF GPT2Model learner, torch.optim.Adam defaults, no clipping). Contenders are
interleaved step by step (A B C A B C ..., order reversed every other round) for `rounds` rounds; a figure
is the median over rounds and a ratio the median of per-round ratios, so load from other processes on a
shared machine falls on both sides of a ratio alike. Wall and process-CPU time are both recorded; at one
thread the CPU clock is the steadier estimate of a quiet machine's wall time.

MFU = model FLOPs per step (`ICLTransformer.flops_per_step`: 2n - 1 tokens, forward + backward; the same
useful work for both models) / step time, over float32 torch.mm throughput (1024^3) timed in the same rounds
at the same thread count.

    python -m bench.train_speed [--sizes small paper] [--rounds 5] [--threads 1] [--eager] [--no-compiled] [--json OUT]
    python -m bench.train_speed --levers [NAME ...]      # each lever against our default step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from icl_core.config import TrainConfig
from icl_core.families import Linear, sample_prompts
from icl_core.model import ICLTransformer, ModelConfig
from icl_core.threaded_step import ThreadedStep, single_threaded_ops
from icl_core.train import build_optimizer

DIM, POINTS, BATCH = 20, 41, 64
SIZES = {
    "paper": {"n_layer": 12, "n_head": 8, "n_embd": 256},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 64},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32},
}
# steps per contender per round
STEPS = {"paper": 1, "small": 6, "tiny": 6}
# untimed steps first: a fresh process page-faults in its allocator's memory for the first 3-4 steps at paper size
# (0.6-1.7 s of system time per step), then touches no new pages (docs/performance.md, "Warm-up")
WARMUP = {"paper": 4, "small": 8, "tiny": 2}


def model_config(size: str) -> ModelConfig:
    return ModelConfig(dim=DIM, max_points=POINTS, **SIZES[size])


@dataclass
class Contender:
    """Something to time: one call of `step` is one training step (or one batch of torch.mm)."""

    name: str
    step: Callable[[], object]
    flops: float = 0.0  # model FLOPs of one call
    threads: int | None = None  # torch.set_num_threads while it runs (None: the process's setting)
    wall: list[float] = field(default_factory=list)  # seconds per call, one entry per round
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per call, one entry per round

    def times(self, clock: str) -> list[float]:
        return self.cpu if clock == "cpu" else self.wall


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fresh_prompts(seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Dense-linear prompts from sample_prompts, as icl_core.train draws them."""
    gen, family = torch.Generator().manual_seed(seed), Linear()
    return lambda: sample_prompts(family, BATCH, POINTS, DIM, gen)


def preallocated_prompts(seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The same distribution drawn in place into buffers allocated once (the 'preallocated buffers' lever)."""
    gen = torch.Generator().manual_seed(seed)
    xs, w, ys = torch.empty(BATCH, POINTS, DIM), torch.empty(BATCH, DIM, 1), torch.empty(BATCH, POINTS, 1)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        xs.normal_(generator=gen)
        w.normal_(std=DIM**-0.5, generator=gen)
        torch.bmm(xs, w, out=ys)
        return xs, ys.view(BATCH, POINTS)

    return draw


def make_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    forward: Callable | None = None,
    grad_clip: float = 0.0,
) -> Callable[[], float]:
    """One training step as icl_core.train does it (prompts, forward, MSE, backward, clip, optimizer step)."""
    fwd = model if forward is None else forward
    params = list(model.parameters())

    def step() -> float:
        xs, ys = data()
        loss = (fwd(xs, ys) - ys).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return loss.item()

    return step


class FullLastLayer(ICLTransformer):
    """Lever experiment, same function: our model before the last block ran at the x positions only (the
    default since 2026-11-25): every block at all 2n - 1 positions, the x positions picked after."""

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        tokens = self.interleave(xs, ys)
        h = self.read_in(tokens) + self.wpe(torch.arange(tokens.shape[1], device=xs.device))
        for block in self.blocks:
            h = block(h)
        return self.read_out(self.ln_f(h[:, ::2])).squeeze(-1)


def build_model(cfg: ModelConfig, full_last_layer: bool = False, gelu: str | None = None) -> ICLTransformer:
    """A fresh model with the model levers applied (`full_last_layer`, `gelu`)."""
    model = (FullLastLayer if full_last_layer else ICLTransformer)(cfg)
    if gelu == "erf":
        for block in model.blocks:
            mlp = block.mlp
            mlp.forward = lambda x, m=mlp: m.c_proj(F.gelu(m.c_fc(x)))
    return model


def ours(
    cfg: ModelConfig,
    *,
    compile: bool = False,
    optimizer: str = "default",
    grad_clip: float | None = None,
    data: str = "fresh",
    gelu: str | None = None,
    full_last_layer: bool = False,
    batch_threads: int = 1,
    seed: int = 0,
) -> Callable[[], float]:
    """Our training step: ICLTransformer + build_optimizer (fused AdamW) + clip 1.0, as in train().

    Levers: `compile` (torch.compile the model), `optimizer` ("default", or Adam with "foreach", "fused" or
    "loop"), `grad_clip` (None = TrainConfig's default), `data` ("fresh" or "preallocated"), `gelu` (None = the
    model's; "erf" = exact GELU, an experiment: not GPT-2's function), `full_last_layer` (see FullLastLayer),
    `batch_threads` (`train.batch_threads`: the batch split over this many single-threaded threads,
    icl_core.threaded_step).
    """
    tc = TrainConfig()
    torch.manual_seed(seed)
    model = build_model(cfg, full_last_layer, gelu)
    if optimizer == "default":
        opt = build_optimizer(model, tc, torch.device("cpu"))
    else:
        impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[optimizer]
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr, **impl)
    draw = preallocated_prompts(seed) if data == "preallocated" else fresh_prompts(seed)
    if batch_threads > 1:
        threaded = ThreadedStep(model, opt, tc.grad_clip if grad_clip is None else grad_clip, batch_threads)

        def step() -> float:
            with single_threaded_ops():  # the whole step, as train() runs it
                return threaded(*draw(), tc.lr).item()

        return step
    return make_step(model, opt, draw, forward=torch.compile(model) if compile else None,
                     grad_clip=tc.grad_clip if grad_clip is None else grad_clip)


def comparator(cfg: ModelConfig, *, attn_implementation: str | None = None, seed: int = 0) -> Callable[[], float]:
    """Garg et al.'s training step: HF GPT2Model learner, torch.optim.Adam(lr=1e-4) with defaults, no clipping."""
    from .comparator import HFGPT2Learner

    torch.manual_seed(seed)
    model = HFGPT2Learner(cfg, attn_implementation)
    return make_step(model, torch.optim.Adam(model.parameters(), lr=1e-4), fresh_prompts(seed))


def matmul(threads: int | None = None, n: int = 1024, reps: int = 4) -> Contender:
    """The MFU denominator: float32 torch.mm of n x n by n x n, `reps` per call, timed like a contender."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def step() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    return Contender(f"torch.mm/{threads or torch.get_num_threads()}t", step, 2.0 * n**3 * reps, threads)


GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def gemm_calls(step: Callable[[], object]) -> list[tuple]:
    """The matrix multiplies one call of `step` makes (forward and backward), as (aten op, argument layouts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {getattr(torch.ops.aten, name).default for name in GEMM_OPS}
    calls: list[tuple] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                calls.append((func, [(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
                                     for a in args], dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    with Record():
        step()
    return calls


def gemm_flops(calls: list[tuple]) -> float:
    """FLOPs of recorded matrix multiplies (2 m n k each; a batched one counts every batch)."""
    total = 0.0
    for _, layouts, _ in calls:
        a, b = [shape for shape, _ in (x for x in layouts if isinstance(x, tuple))][-2:]
        total += 2.0 * math.prod(a) * b[-1]
    return total


def gemm_floor(step: Callable[[], object]) -> Contender:
    """Our step's matrix multiplies alone, replayed with the same shapes and memory layouts on random data.

    Nothing else of the step runs (no attention, elementwise work, optimizer or data), so no implementation
    that keeps this float32 arithmetic on these BLAS calls can step faster: comparator time / floor time
    bounds the speedup any such implementation can reach over the comparator, in the same run.
    """
    step()  # warm: first-call allocations stay out of the recording
    calls = gemm_calls(step)
    replay = [(func, [torch.empty_strided(*x).normal_() if isinstance(x, tuple) else x for x in layouts], kw)
              for func, layouts, kw in calls]

    def floor() -> None:
        for func, args, kw in replay:
            func(*args, **kw)

    return Contender("gemm_floor", floor, gemm_flops(calls))


def alternate(contenders: list[Contender], rounds: int, steps: int, warmup: int = 2) -> None:
    """Interleave the contenders step by step (A B C A B C ...; reversed order every other round), so load
    from other processes falls on all of them alike; record wall and process-CPU seconds per call per round."""
    for c in contenders:
        with num_threads(c.threads):
            for _ in range(warmup):
                c.step()
    for r in range(rounds):
        wall = {c.name: 0.0 for c in contenders}
        cpu = dict(wall)
        order = contenders if r % 2 == 0 else contenders[::-1]
        for _ in range(steps):
            for c in order:
                with num_threads(c.threads):
                    w0, c0 = time.perf_counter(), time.process_time()
                    c.step()
                    wall[c.name] += time.perf_counter() - w0
                    cpu[c.name] += time.process_time() - c0
        for c in contenders:
            c.wall.append(wall[c.name] / steps)
            c.cpu.append(cpu[c.name] / steps)


def ratio(base: Contender, other: Contender, clock: str = "wall") -> float:
    """Median over rounds of base's time / other's time: how many times faster `other` is than `base`."""
    return statistics.median(b / o for b, o in zip(base.times(clock), other.times(clock)))


def summary(c: Contender, mm: Contender | None) -> dict:
    """Per clock: median seconds per step, steps/s, achieved FLOP/s and MFU (per-round ratio to torch.mm)."""
    out: dict = {"threads": c.threads or torch.get_num_threads(), "rounds": len(c.wall)}
    for clock in ("wall", "cpu"):
        t = statistics.median(c.times(clock))
        d = {"s_per_step": t, "steps_per_s": 1.0 / t, "per_round": c.times(clock)}
        if c.flops:
            d["achieved_flops"] = c.flops / t
        if c.flops and mm is not None and mm is not c:
            d["mfu"] = statistics.median(
                (c.flops / t) / (mm.flops / m) for t, m in zip(c.times(clock), mm.times(clock))
            )
        out[clock] = d
    return out


def machine() -> dict:
    """What ran the benchmark: CPU model, cores, library versions, torch threads."""
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": tf,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cs: list[Contender], rounds: int, steps: int, warmup: int = 2) -> dict:
    """Time `cs` plus a torch.mm contender per thread count; per-contender summaries."""
    mms = {}
    for c in cs:
        t = c.threads or torch.get_num_threads()
        if t not in mms:
            mms[t] = matmul(c.threads)
    load_before = load()
    alternate([*cs, *mms.values()], rounds, steps, warmup)
    contenders = {c.name: summary(c, mms[c.threads or torch.get_num_threads()]) for c in cs}
    contenders.update({m.name: summary(m, None) for m in mms.values()})
    return {"loadavg_before_after": [load_before, load()], "contenders": contenders}


def compare_size(size: str, rounds: int, steps: int | None = None, eager: bool = False,
                 compiled: bool = True, floor: bool = True) -> dict:
    """Ours vs the comparator at one size: steps/s of each, the ratio, MFU.

    `ours` is the default step (`train.compile: false`); `ours_compiled` the step with `train.compile: true`, as
    the paper-scale sweep files train (its compile time falls in the warm-up steps, outside the timing).
    `gemm_floor` (see `gemm_floor`) is our step's matrix multiplies alone: its "vs HF" is the most any float32
    implementation on these GEMMs could reach; its MFU is their rate against 1024^3 torch.mm.
    """
    cfg = model_config(size)
    flops = ICLTransformer(cfg).flops_per_step(POINTS, BATCH)
    cs = [Contender("ours", ours(cfg), flops), Contender("hf_gpt2", comparator(cfg), flops)]
    if compiled:
        cs.append(Contender("ours_compiled", ours(cfg, compile=True), flops))
    if eager:
        cs.append(Contender("hf_gpt2_eager", comparator(cfg, attn_implementation="eager"), flops))
    if floor:
        cs.append(gemm_floor(ours(cfg)))
    res = {"size": size, "model": SIZES[size], "flops_per_step": flops, "threads": torch.get_num_threads(),
           **run(cs, rounds, steps or STEPS[size], WARMUP[size])}
    res["speedup_vs_hf_gpt2"] = {clock: {c.name: ratio(cs[1], c, clock) for c in cs if c.name != "hf_gpt2"}
                                 for clock in ("wall", "cpu")}
    return res


# Levers, each one change from our default step, timed against it (and the comparator) in one run.
LEVERS: dict[str, dict] = {
    "fused_adam": {"optimizer": "fused"},
    "foreach_adam": {"optimizer": "foreach"},
    "loop_adam": {"optimizer": "loop"},
    "no_clip": {"grad_clip": 0.0},
    "preallocated_data": {"data": "preallocated"},
    "compile": {"compile": True},
    "erf_gelu": {"gelu": "erf"},
    "full_last_layer": {"full_last_layer": True},
    "batch_threads_2": {"batch_threads": 2},
    "batch_threads_2_foreach_adam": {"batch_threads": 2, "optimizer": "foreach"},
}
# Thread count is not a lever to switch inside one process (libgomp's spinning workers and the pool resize
# make a 2-thread contender there slower than in its own process): compare `--threads 1` and `--threads 2` runs.


def levers(size: str, names: list[str], rounds: int, steps: int | None = None) -> dict:
    """Our default step, the comparator and each lever in `names`, interleaved; speedups over our default."""
    cfg = model_config(size)
    flops = ICLTransformer(cfg).flops_per_step(POINTS, BATCH)
    cs = [Contender("ours", ours(cfg), flops), Contender("hf_gpt2", comparator(cfg), flops)]
    for name in names:
        opts = dict(LEVERS[name])
        threads = opts.pop("threads", None)
        cs.append(Contender(name, ours(cfg, **opts), flops, threads=threads))
    res = {"size": size, "model": SIZES[size], "flops_per_step": flops, "threads": torch.get_num_threads(),
           **run(cs, rounds, steps or STEPS[size], WARMUP[size])}
    res["speedup_vs_ours"] = {clock: {c.name: ratio(cs[0], c, clock) for c in cs[1:]} for clock in ("wall", "cpu")}
    res["speedup_vs_hf_gpt2"] = {clock: {c.name: ratio(cs[1], c, clock) for c in cs if c.name != "hf_gpt2"}
                                 for clock in ("wall", "cpu")}
    return res


def make_contender_step(name: str, cfg: ModelConfig) -> Callable[[], float]:
    """A contender's training step by name: ours, ours_compiled, hf_gpt2, hf_gpt2_eager or a lever."""
    if name in ("hf_gpt2", "hf_gpt2_eager"):
        return comparator(cfg, attn_implementation="eager" if name == "hf_gpt2_eager" else None)
    if name in ("ours", "ours_compiled"):
        return ours(cfg, compile=name == "ours_compiled")
    opts = dict(LEVERS[name])
    opts.pop("threads", None)
    return ours(cfg, **opts)


SOLO_NAMES = ["ours", "ours_compiled", "hf_gpt2", "hf_gpt2_eager", *LEVERS]


def time_one(name: str, size: str, steps: int, warmup: int | None = None) -> dict:
    """Seconds per step of one contender alone in this process (the child side of `solo`), and the page
    faults per step, which show whether the warm-up reached the steady state."""
    step = make_contender_step(name, model_config(size))
    for _ in range(WARMUP[size] if warmup is None else warmup):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return {"wall": (time.perf_counter() - w0) / steps, "cpu": (time.process_time() - c0) / steps,
            "page_faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps}


def solo_spec(spec: str) -> tuple[str, int | None]:
    """"NAME" or "NAME@T" (T torch threads in its process) -> (NAME, T or None)."""
    name, _, threads = spec.partition("@")
    if name not in SOLO_NAMES or (threads and not threads.isdigit()):
        raise argparse.ArgumentTypeError(f"{spec!r}: want NAME or NAME@THREADS, NAME one of {', '.join(SOLO_NAMES)}")
    return name, int(threads) if threads else None


def solo(size: str, names: list[str], rounds: int, steps: int | None = None) -> dict:
    """Each contender in a fresh process of its own, the processes alternating (A B A B ..., order reversed
    every other round): a cross-check on the in-process runs, where contenders share one allocator and cache.

    A name may carry its process's torch threads, "hf_gpt2@2" (default: this process's count), which is how
    thread counts are compared. Besides the ratio to hf_gpt2, each contender gets one to the best HF setting
    run ("vs_best_hf": per round, the fastest of hf_gpt2 and hf_gpt2@T over this contender).
    """
    cfg = model_config(size)
    flops = ICLTransformer(cfg).flops_per_step(POINTS, BATCH)
    specs = {n: solo_spec(n) for n in names}
    cs = {n: Contender(n, lambda: None, flops, t or torch.get_num_threads()) for n, (_, t) in specs.items()}
    faults: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out = subprocess.run(
                [sys.executable, "-m", "bench.train_speed", "--one", specs[n][0], "--sizes", size, "--steps",
                 str(steps or STEPS[size]), "--threads", str(cs[n].threads)],
                cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
            t = json.loads(out.stdout.strip().splitlines()[-1])
            cs[n].wall.append(t["wall"])
            cs[n].cpu.append(t["cpu"])
            faults[n].append(t["page_faults"])
    res = {"size": size, "model": SIZES[size], "flops_per_step": flops, "threads": torch.get_num_threads(),
           "solo": True, "warmup": WARMUP[size],
           "contenders": {n: {**summary(c, None), "page_faults_per_step": faults[n]} for n, c in cs.items()}}
    base = cs.get("hf_gpt2")
    res["speedup_vs_hf_gpt2"] = {clock: {n: ratio(base, c, clock) for n, c in cs.items() if n != "hf_gpt2"}
                                 for clock in ("wall", "cpu")} if base else {"wall": {}, "cpu": {}}
    hf = [c for n, c in cs.items() if specs[n][0] == "hf_gpt2"]
    if len(hf) > 1:
        res["speedup_vs_best_hf"] = {"wall": {
            n: statistics.median(min(h.wall[r] for h in hf) / c.wall[r] for r in range(rounds))
            for n, c in cs.items() if c not in hf}}
    return res


def profile(size: str, steps: int = 2, rows: int = 15) -> None:
    """Where the time of one training step goes: torch.profiler's op table for ours and the comparator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = model_config(size)
    makers: list[tuple[str, Callable[[], Callable[[], float]]]] = [("ours", lambda: ours(cfg))]
    with contextlib.suppress(ImportError):
        import transformers  # noqa: F401

        makers.append(("hf_gpt2", lambda: comparator(cfg)))
    for name, make in makers:
        step = make()
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        print(f"== {name} at {size}, {steps} steps, {torch.get_num_threads()} thread(s)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def format_table(results: list[dict], clock: str = "wall") -> str:
    """One line per contender: steps/s, achieved GFLOP/s, MFU and speedups, on one clock."""
    rel = any("speedup_vs_ours" in r for r in results)
    best = clock == "wall" and any("speedup_vs_best_hf" in r for r in results)
    lines = [f"{'[' + clock + ' clock]':<12} {'size':<6} {'contender':<18} {'steps/s':>8} {'GFLOP/s':>8} {'MFU':>6}"
             f" {'vs HF':>6}"
             + (f" {'vs ours':>7}" if rel else "") + (f" {'vs best HF':>10}" if best else "")]
    for r in results:
        vs_hf = r["speedup_vs_hf_gpt2"][clock]
        vs_ours = r.get("speedup_vs_ours", {}).get(clock, {})
        vs_best = r.get("speedup_vs_best_hf", {}).get(clock, {})
        for name, s in r["contenders"].items():
            d = s[clock]
            mfu = f"{d['mfu']:.1%}" if "mfu" in d else ""
            hf = f"{vs_hf[name]:.2f}x" if name in vs_hf else ""
            line = (f"{'':12} {r['size']:<6} {name:<18} {d['steps_per_s']:8.2f}"
                    f" {d.get('achieved_flops', 0) / 1e9:8.1f} {mfu:>6} {hf:>6}")
            if rel:
                line += f" {(f'{vs_ours[name]:.2f}x' if name in vs_ours else ''):>7}"
            if best:
                line += f" {(f'{vs_best[name]:.2f}x' if name in vs_best else ''):>10}"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["small", "paper"], choices=sorted(SIZES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="steps per contender per round (default per size)")
    p.add_argument("--eager", action="store_true", help="also time HF GPT2 with eager (2022-era) attention")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our step with train.compile (on by default)")
    p.add_argument("--levers", nargs="*", default=None, choices=sorted(LEVERS),
                   help="time these levers (all when none named) against our default instead")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    p.add_argument("--profile", action="store_true",
                   help="instead: torch.profiler op table of our step (and the comparator's) at each size")
    p.add_argument("--solo", nargs="+", default=None, type=str, metavar="NAME[@THREADS]",
                   help="instead: these contenders each in a process of its own, alternating (a cross-check); "
                        "NAME@T runs that one at T torch threads")
    p.add_argument("--one", default=None, choices=SOLO_NAMES, help=argparse.SUPPRESS)  # a --solo child
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(time_one(a.one, a.sizes[0], a.steps or STEPS[a.sizes[0]])))
        return 0
    if a.profile:
        for size in a.sizes:
            profile(size, a.steps or 2)
        return 0
    for spec in a.solo or []:
        try:
            solo_spec(spec)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
    if a.solo:
        results = [solo(s, a.solo, a.rounds, a.steps) for s in a.sizes]
    elif a.levers is not None:
        names = a.levers or list(LEVERS)
        results = [levers(s, names, a.rounds, a.steps) for s in a.sizes]
    else:
        results = [compare_size(s, a.rounds, a.steps, a.eager, a.compiled) for s in a.sizes]
    for clock in ("wall", "cpu"):
        print(format_table(results, clock))
    if a.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                "command": "python -m bench.train_speed " + " ".join(argv if argv is not None else sys.argv[1:])}
        Path(a.json).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
