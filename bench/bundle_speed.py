"""Bundled training against separate trials: aggregate model-steps/s of K configs trained as one bundled model
(icl_core.bundle) and of the same K configs trained as K separate runs, on the same cores, in one run.

Both contenders use `workers` single-thread processes (started and warmed before timing): the separate trials
are queued over them one run at a time, the bundled ones split into `workers` bundles of K / workers members.
The configs are a sweep file's base config with seeds 0..K-1, trained for `steps` steps; the figure is
K x steps over the wall time of the whole batch of work. Sizes: the quickstart and the CPU twins' base configs.

Each row also carries the most a bundle could buy (`ceiling`): a bundle shares the per-step cost that does not grow
with the batch (op dispatch, small kernels, the optimizer's per-tensor work), never the arithmetic on the batch. With
t the solo step time at the size's batch and f that at batch 1 (both from the difference of runs of 2 x steps and
steps, so set-up and the final checkpoint drop out), K separate steps cost K t and K bundled ones at least
K (t - f) + f; f counts some arithmetic too, so the ceiling K t / (K (t - f) + f) is an upper bound.

Where the fixed cost is what a step pays (a GPU launching a kernel per op), what a bundle shares is ops: `ops` counts
the ATen calls one training step's Python code makes (forward, loss, clipping, optimizer, prompt sampling; not the
backward's, which autograd makes for each differentiable forward op), per model-step, of a solo run and of
bundles of K at paper size and batch 2 (the count does not depend on the batch). A proxy for launches, not a count.

    python -m bench.bundle_speed [--sizes quickstart cpu_twin] [--ks 1 2 4 8 16] [--steps 40] \
        [--ops-size paper] [--ops-ks 1 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SIZES = {"quickstart": "sweeps/quickstart.yaml", "cpu_twin": "sweeps/mixture_weights_cpu.yaml",
         "paper": "sweeps/mixture_weights.yaml"}


def configs(size: str, k: int, steps: int) -> list[dict]:
    """K run configs of one shape: the sweep file's base with seeds 0..K-1, `steps` steps, no mid-run checkpoint."""
    from icl_core.config import read_yaml

    base = read_yaml(ROOT / SIZES[size]).get("base", {}) if size in SIZES else json.loads(size)
    train = {**base.get("train", {}), "steps": steps, "checkpoint_every": steps, "log_every": steps,
             "warmup_steps": 0, "schedule": "constant", "device": "cpu"}
    train.pop("decay_steps", None)
    train.pop("min_lr_ratio", None)
    return [{**base, "train": train, "seed": s} for s in range(k)]


WARM = {"data": {"dim": 2, "n_points": 4}, "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
        "train": {"steps": 2, "batch_size": 4, "device": "cpu"}}


def _warm(_: int) -> None:
    """Imports and first calls out of the timed work: a two-step solo run and bundle in each worker."""
    import torch

    torch.set_num_threads(1)
    _train(("solo", [WARM]))
    _train(("bundle", [WARM, {**WARM, "seed": 1}]))


def _train(task: tuple[str, list[dict]]) -> float:
    """One unit of work in a worker: a solo run, or a bundle of several; its training seconds."""
    from icl_core.bundle import train_bundle
    from icl_core.config import validate_run_config
    from icl_core.train import train

    kind, raw = task
    cfgs = [validate_run_config(c) for c in raw]
    with tempfile.TemporaryDirectory(prefix="iclmix-bundle-bench-") as d:
        start = time.perf_counter()
        if kind == "solo":
            train(cfgs[0], Path(d) / "run", progress=False)
        else:
            train_bundle(cfgs, [Path(d) / str(i) for i in range(len(cfgs))], progress=False)
        return time.perf_counter() - start


def _ops(task: tuple[str, list[dict]]) -> int:
    """ATen calls made from Python (not from inside another ATen op or autograd) by a solo run or a bundle."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train(task)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def _per_step(work, size: str, kind: str, k: int, batch: int | None, steps: int, pool, repeats: int = 1) -> float:
    """`work` (_train or _ops) per step of K configs of `size` at `batch` (None: the size's own): the difference of
    runs of 2 x steps and steps (the best of `repeats` each), so set-up and the final checkpoint drop out."""
    def run(n: int) -> float:
        cfgs = configs(size, k, n)
        if batch is not None:
            cfgs = [{**c, "train": {**c["train"], "batch_size": batch}} for c in cfgs]
        return min(pool.apply(work, ((kind, cfgs),)) for _ in range(repeats))

    return (run(2 * steps) - run(steps)) / steps


def ops_per_model_step(size: str, ks: list[int], steps: int, pool) -> dict:
    """ATen calls per model-step of a solo run and of bundles of K, at batch 2."""
    return {"size": size, "batch": 2, "solo": _per_step(_ops, size, "solo", 1, 2, steps, pool),
            "bundled": {str(k): _per_step(_ops, size, "bundle", k, 2, steps, pool) / k for k in ks}}


def step_seconds(size: str, batch: int | None, steps: int, pool) -> float:
    """Seconds per solo training step at `batch` (None: the size's own)."""
    return max(_per_step(_train, size, "solo", 1, batch, steps, pool, repeats=2), 1e-9)


def ceiling(per_step: float, fixed: float, k: int) -> float:
    """The most K bundled members can gain over K separate runs when only the fixed per-step cost is shared."""
    fixed = min(fixed, per_step)
    return k * per_step / (k * (per_step - fixed) + fixed)


def measure(size: str, k: int, steps: int, pool, workers: int) -> dict:
    """Model-steps/s of K separate runs and of K bundled members on `workers` processes, and their ratio."""
    cfgs = configs(size, k, steps)
    separate = [("solo", [c]) for c in cfgs]
    n = min(k, workers)
    bundled = [("bundle", cfgs[i::n]) for i in range(n)]
    out = {"size": size, "k": k, "steps": steps, "workers": workers}
    for name, tasks in (("separate", separate), ("bundled", bundled)):
        start = time.perf_counter()
        pool.map(_train, tasks, chunksize=1)
        wall = time.perf_counter() - start
        out[f"{name}_s"] = round(wall, 6)
        out[f"{name}_model_steps_per_s"] = round(k * steps / wall, 2)
    out["bundled_over_separate"] = round(out["bundled_model_steps_per_s"] / out["separate_model_steps_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["quickstart", "cpu_twin"],
                    help=f"sweep sizes ({', '.join(SIZES)}) or a JSON base config")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--ops-size", default="paper", help="the size whose ops per model-step are counted ('' : none)")
    ap.add_argument("--ops-ks", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--json", type=Path, default=RESULTS / "bundle-speed.json")
    args = ap.parse_args(argv)
    for flag, size in [("--sizes", s) for s in args.sizes] + [("--ops-size", args.ops_size)] * bool(args.ops_size):
        try:
            ok = size in SIZES or isinstance(json.loads(size), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            print(f"{flag}: {size!r} is neither a size ({', '.join(SIZES)}) nor a JSON base config", file=sys.stderr)
            raise SystemExit(2)
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        pool.map(_warm, range(args.workers))
        for size in args.sizes:
            per_step, fixed = (step_seconds(size, b, args.steps, pool) for b in (None, 1))
            print(f"{size[:12]:>12} solo step {per_step * 1e3:.1f} ms at its batch, {fixed * 1e3:.1f} ms at batch 1",
                  flush=True)
            for k in args.ks:
                row = measure(size, k, args.steps, pool, args.workers)
                row.update(step_ms=round(per_step * 1e3, 3), batch_1_step_ms=round(fixed * 1e3, 3),
                           ceiling=round(ceiling(per_step, fixed, k), 3))
                rows.append(row)
                sep, bun = row["separate_model_steps_per_s"], row["bundled_model_steps_per_s"]
                print(f"{size[:12]:>12} K={k:<3} model-steps/s: separate {sep:8.2f}, bundled {bun:8.2f}, "
                      f"ratio {row['bundled_over_separate']:.2f} (ceiling {row['ceiling']:.2f})", flush=True)
        ops = ops_per_model_step(args.ops_size, args.ops_ks, 2, pool) if args.ops_size else None
    if ops:
        print(f"{args.ops_size[:12]:>12} ATen ops per model-step: solo {ops['solo']:.0f}, "
              + ", ".join(f"bundle of {k} {n:.0f}" for k, n in ops["bundled"].items()), flush=True)
    result = {"benchmark": "bundle_speed", "host": platform.node(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "ops_per_model_step": ops}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
