"""Training throughput on one GPU: steps/s at paper size per variant, trials sharing the GPU, GPU-hours.

Variants (each a full training step: prompts drawn on the device, forward, MSE, backward, clip, AdamW):
  eager         bf16 autocast, fused AdamW (as icl_core.train runs on CUDA)
  compile       + torch.compile(model)
  compile_ro    + torch.compile(model, mode="reduce-overhead"): inductor's CUDA graphs of forward and backward
  graph         + the whole step (forward, backward, clip, optimizer) captured in one CUDA graph and replayed;
                prompts are drawn into static buffers outside the graph (CUDA only)
  loop          icl_core.train.train itself (what a trial runs), train.compile false
  loop_compile  the same with train.compile true
  loop_graph    the same with train.cuda_graph true (icl_core.cuda_graph; CUDA only)
  bundle_K      icl_core.bundle.train_bundle with K members (seeds 0..K-1) as one batched model: steps/s, MFU and
                GPU-hours are per model (K model-steps per bundle step), with the peak memory on CUDA
MFU = achieved model FLOP/s over the measured matrix-product rate (bf16 8192^3 on CUDA, fp32 1024^3 on CPU).

Sharing: k trials as k separate processes on one GPU (as Ray packs fractional-GPU trials), each capped at
1/k of the GPU memory; they warm up, wait for a common start, run `--steps` steps; aggregate throughput is
all their steps over the span from the first start to the last end. GPU-hours for the reference run
(Garg et al.: 500 k steps, batch 64, 41 points) = 500 k / per-GPU aggregate steps/s.

    python -m bench.gpu                          # paper size on CUDA: variants, then 1, 2, 4, 8 trials
    python -m bench.gpu --tiny --device cpu      # the same machinery at tiny size on CPU (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from icl_core.config import TrainConfig
from icl_core.families import Linear, sample_prompts
from icl_core.model import ICLTransformer, ModelConfig
from icl_core.train import build_optimizer

from .train_speed import BATCH, DIM, POINTS, SIZES

REFERENCE_STEPS = 500_000
STEP_VARIANTS = ("eager", "compile", "compile_ro", "graph")
LOOP_VARIANTS = ("loop", "loop_compile", "loop_graph")  # icl_core.train.train itself
ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(size: str, device: torch.device, variant: str, seed: int = 0) -> tuple[Callable[[], None], float]:
    """A training step of `variant` at `size` on `device`, and its model FLOPs."""
    cfg = ModelConfig(dim=DIM, max_points=POINTS, **SIZES[size])
    tc = TrainConfig()
    torch.manual_seed(seed)
    model = ICLTransformer(cfg).to(device)
    flops = model.flops_per_step(POINTS, BATCH)
    gen = torch.Generator(device=device).manual_seed(seed)
    family = Linear()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    params = list(model.parameters())

    if variant in ("eager", "compile", "compile_ro"):
        optimizer = build_optimizer(model, tc, device)
        forward = {"eager": model, "compile": torch.compile(model),
                   "compile_ro": torch.compile(model, mode="reduce-overhead")}[variant]

        def step() -> None:
            xs, ys = sample_prompts(family, BATCH, POINTS, DIM, gen)
            with autocast:
                pred = forward(xs, ys)
            loss = (pred.float() - ys).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()

        return step, flops

    if variant != "graph":
        raise ValueError(f"unknown variant {variant!r}")
    if device.type != "cuda":
        raise ValueError("the graph variant needs CUDA")
    # Whole-step capture (PyTorch's "whole network capture" recipe): capturable fused AdamW, static inputs.
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=0.0, fused=True, capturable=True)
    static_xs, static_ys = sample_prompts(family, BATCH, POINTS, DIM, gen)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # required under capture

    def body() -> None:
        with autocast:
            pred = model(static_xs, static_ys)
        loss = (pred.float() - static_ys).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()

    def step() -> None:
        xs, ys = sample_prompts(family, BATCH, POINTS, DIM, gen)
        static_xs.copy_(xs)
        static_ys.copy_(ys)
        graph.replay()

    return step, flops


def matmul_tflops(device: torch.device, reps: int = 10) -> dict:
    """The machine's measured matrix-product rate, the MFU denominator: bf16 8192^3 on CUDA, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # random data: zeros run faster
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / dt / 1e12}


def _loop_config(size: str, device: torch.device, steps: int, log_every: int, seed: int = 0, **train_kw):
    from icl_core.config import validate_run_config

    return validate_run_config({
        "seed": seed,
        "data": {"dim": DIM, "n_points": POINTS, "mixture": [{"family": "linear", "weight": 1.0}]},
        "model": SIZES[size],
        "train": {"steps": steps, "batch_size": BATCH, "log_every": log_every, "checkpoint_every": steps,
                  "device": device.type, **train_kw},
    })


def _logged_seconds(run_dir: Path, first: int, last: int) -> float:
    """Training seconds between two logged steps of a run folder's metrics."""
    import csv

    from icl_core.train import METRICS

    with open(run_dir / METRICS, newline="") as f:
        t = {int(r["step"]): float(r["time_s"]) for r in csv.DictReader(f)}
    return t[last] - t[first]


def train_loop(size: str, device: torch.device, steps: int, warmup: int, compile_: bool = False,
               cuda_graph: bool = False) -> dict:
    """Steps/s of `icl_core.train.train` itself at `size` (the loop a trial runs: logging, the non-finite check,
    bf16 autocast and fused AdamW on CUDA), timed between two logged steps so no checkpoint falls inside."""
    from icl_core.train import train

    steps = -(-steps // warmup) * warmup  # a multiple of log_every, so the last step is a logged one
    cfg = _loop_config(size, device, warmup + steps, warmup, compile=compile_, cuda_graph=cuda_graph)
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as d:
        train(cfg, d, progress=False)
        seconds = _logged_seconds(Path(d), warmup, warmup + steps)
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds}


def bundle_loop(size: str, device: torch.device, steps: int, warmup: int, k: int) -> dict:
    """Model-steps/s of `icl_core.bundle.train_bundle` with k members (seeds 0..k-1) at `size`, timed as
    `train_loop`; on CUDA also the peak memory it allocated."""
    from icl_core.bundle import train_bundle

    steps = -(-steps // warmup) * warmup
    cfgs = [_loop_config(size, device, warmup + steps, warmup, seed=s) for s in range(k)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as d:
        train_bundle(cfgs, [Path(d) / str(s) for s in range(k)], progress=False)
        seconds = _logged_seconds(Path(d) / "0", warmup, warmup + steps)
    out = {"steps": steps, "seconds": seconds, "steps_per_s": k * steps / seconds,
           "bundle_steps_per_s": steps / seconds}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    return {"steps": steps, "seconds": dt, "steps_per_s": steps / dt}


def variants_table(size: str, device: torch.device, variants: list[str], steps: int, warmup: int,
                   repeats: int) -> dict:
    """Steps/s of each variant (median of `repeats` timings, after `warmup` steps), with MFU-free FLOP/s."""
    out = {}
    flops = ICLTransformer(ModelConfig(dim=DIM, max_points=POINTS, **SIZES[size])).flops_per_step(POINTS, BATCH)
    for v in variants:
        if v in LOOP_VARIANTS or v.startswith("bundle_"):
            try:
                if v.startswith("bundle_"):
                    runs = [bundle_loop(size, device, steps, warmup, int(v.removeprefix("bundle_")))
                            for _ in range(repeats)]
                else:
                    runs = [train_loop(size, device, steps, warmup, compile_=v == "loop_compile",
                                       cuda_graph=v == "loop_graph") for _ in range(repeats)]
            except Exception as e:  # e.g. a bundle too large for the card's memory
                out[v] = {"error": f"{type(e).__name__}: {e}"[:500]}
                continue
            sps = statistics.median(r["steps_per_s"] for r in runs)  # model-steps/s: K per bundle step
            out[v] = {"steps_per_s": sps, "achieved_tflops": flops * sps / 1e12,
                      "runs": [r["steps_per_s"] for r in runs], "gpu_hours_500k": REFERENCE_STEPS / sps / 3600,
                      **({"peak_memory_gib": max(r["peak_memory_gib"] for r in runs)}
                         if "peak_memory_gib" in runs[0] else {})}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        try:
            step, flops = build_step(size, device, v)
        except Exception as e:  # a variant that cannot run here (no compiler, no CUDA graphs) is reported
            out[v] = {"error": f"{type(e).__name__}: {e}"}
            continue
        runs = [time_steps(step, device, steps, warmup if i == 0 else 1) for i in range(repeats)]
        sps = statistics.median(r["steps_per_s"] for r in runs)
        out[v] = {"steps_per_s": sps, "achieved_tflops": flops * sps / 1e12, "runs": [r["steps_per_s"] for r in runs],
                  "gpu_hours_500k": REFERENCE_STEPS / sps / 3600}
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def worker(a: argparse.Namespace) -> int:
    """One trial of a sharing run: warm up, say ready, wait for go, time `steps` steps, print JSON."""
    device = torch.device(a.device)
    if device.type == "cpu" and a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cuda" and a.share > 1:
        torch.cuda.set_per_process_memory_fraction(1.0 / a.share, device.index or 0)
    step, _ = build_step(a.size, device, a.variant, seed=a.seed)
    for _ in range(a.warmup):
        step()
    sync(device)
    sync_dir = Path(a.sync_dir)
    (sync_dir / f"ready.{a.seed}").touch()
    deadline = time.monotonic() + 600
    while not (sync_dir / "go").exists():
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.01)
    start = time.time()
    for _ in range(a.steps):
        step()
    sync(device)
    end = time.time()
    print(json.dumps({"start": start, "end": end, "steps": a.steps}), flush=True)
    return 0


def share(size: str, device: str, variant: str, k: int, steps: int, warmup: int, threads: int | None) -> dict:
    """k trials in k processes on one device; aggregate and per-trial steps/s."""
    env = dict(os.environ)
    threads = threads or (1 if device == "cpu" else None)  # k CPU trials must not oversubscribe the cores
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as d:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.gpu", "--worker", "--size", size, "--device", device,
                 "--variant", variant, "--steps", str(steps), "--warmup", str(warmup), "--seed", str(i),
                 "--share", str(k), "--sync-dir", d, *(["--threads", str(threads)] if threads else [])],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for i in range(k)
        ]
        try:
            deadline = time.monotonic() + 900
            while len(list(Path(d).glob("ready.*"))) < k:
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            (Path(d) / "go").touch()
            outs = [p.communicate(timeout=900) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    failed = [(p.returncode, err.strip().splitlines()[-1:] if err else []) for p, (_, err) in zip(procs, outs)
              if p.returncode != 0]
    if failed:
        return {"trials": k, "error": f"{len(failed)} of {k} trial processes failed: {failed}"}
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    total = sum(r["steps"] for r in rows)
    per_trial = [r["steps"] / (r["end"] - r["start"]) for r in rows]
    agg = total / span
    return {
        "trials": k,
        "aggregate_steps_per_s": agg,
        "per_trial_steps_per_s": per_trial,
        "gpu_hours_per_500k_trial": REFERENCE_STEPS / agg / 3600,
        "wall_hours_500k_each": REFERENCE_STEPS / statistics.median(per_trial) / 3600,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="paper", choices=sorted(SIZES))
    p.add_argument("--tiny", action="store_true", help="shorthand for --size tiny and few steps (CPU smoke test)")
    p.add_argument("--variants", nargs="+", default=None, help="default: eager compile graph on CUDA, eager on CPU")
    p.add_argument("--share-variant", default=None,
                   help="the variant the sharing runs use (default: the fastest one that does not compile)")
    p.add_argument("--trials", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each trial process (CPU default 1)")
    p.add_argument("--json", default=None, help="write the results here")
    # internal: one trial process of a sharing run
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--share", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--sync-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        a.size = "tiny"
    if a.worker:
        a.steps = a.steps or 50
        a.warmup = 3 if a.warmup is None else a.warmup
        return worker(a)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; try --tiny --device cpu", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(a.threads or 1)  # as each trial process runs (see share)
    variants = a.variants or (["eager", "compile", "graph", "loop", "loop_compile", "loop_graph",
                               "bundle_1", "bundle_4", "bundle_16", "bundle_32"]
                              if device.type == "cuda"
                              else ["eager", "loop", "bundle_2"])
    steps = a.steps or (5 if a.tiny else 200 if device.type == "cuda" else 3)
    warmup = a.warmup if a.warmup is not None else (2 if a.tiny else 20 if device.type == "cuda" else 1)
    res: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": a.size,
        "model": SIZES[a.size],
        "batch": BATCH,
        "points": POINTS,
        "dim": DIM,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "matmul": matmul_tflops(device),
    }

    def save() -> None:  # after every stage, so a run cut short still leaves what it measured
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=2))

    res["variants"] = {}
    for v in variants:  # saved one by one: a run cut short keeps the variants it timed
        res["variants"].update(variants_table(a.size, device, [v], steps, warmup, a.repeats))
        if "achieved_tflops" in res["variants"][v]:
            res["variants"][v]["mfu"] = res["variants"][v]["achieved_tflops"] / res["matmul"]["tflops"]
        save()
    print(f"{a.size} on {res['device']}: steps/s per variant (one process); matmul "
          f"{res['matmul']['dtype']} {res['matmul']['tflops']:.1f} TFLOP/s", flush=True)
    for v, r in res["variants"].items():
        line = f"  {v:<12} " + (f"{r['steps_per_s']:8.2f} steps/s  {r['achieved_tflops']:7.2f} TFLOP/s  "
                                f"MFU {r['mfu']:6.1%}  {r['gpu_hours_500k']:8.1f} GPU-h/500k"
                                if "steps_per_s" in r else r["error"])
        print(line, flush=True)
    ok = {v: r["steps_per_s"] for v, r in res["variants"].items() if "steps_per_s" in r and v in STEP_VARIANTS}
    if not ok:
        return 1
    # By default the fastest variant that does not compile: each sharing process would spend a minute compiling.
    uncompiled = {v: sps for v, sps in ok.items() if not v.startswith("compile")} or ok
    share_variant = a.share_variant if a.share_variant in ok else max(uncompiled, key=uncompiled.get)
    res["share_variant"] = share_variant
    res["sharing"] = []
    print(f"trials sharing one {a.device} ({share_variant}):", flush=True)
    for k in a.trials:
        s = share(a.size, a.device, share_variant, k, steps, warmup, a.threads)
        res["sharing"].append(s)
        save()
        if "error" in s:
            print(f"  {k} trials: {s['error']}", flush=True)
            continue
        print(f"  {s['trials']} trials: {s['aggregate_steps_per_s']:8.2f} steps/s aggregate, "
              f"{statistics.median(s['per_trial_steps_per_s']):8.2f} per trial, "
              f"{s['gpu_hours_per_500k_trial']:8.1f} GPU-h per 500k-step trial", flush=True)
    return 0 if all("error" not in s for s in res["sharing"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
