"""Time to competence: how long a CPU recipe takes until its model has learned regression in context.

A recipe is a run config's `model` and `train` sections. Each is trained with `icl_core.train.train` on dense
linear (d = 5, 11 points), on `sparse_linear(nnz=1)` and on their 50/50 mixture; every `--eval-every` steps the
checkpoint is evaluated on one fixed held-out prompt set (the same prompts for every recipe, seed and step).
Competence is the mean error over k = d ... n-1 (where least squares is exact) at <= 0.1 and <= 0.05 (for the
mixture, on each of its two families). Wall time counts training only (evaluation is subtracted) and is measured
as a sweep trains: `--jobs` runs at once, `--threads` torch threads each. At the end each run is evaluated by k
against least squares, Lasso and `bayes_task`. Figures are medians over seeds; the ratios compare wall time to
competence with Garg et al.'s recipe and the earlier CPU-twin recipe, run in the same invocation (a recipe that
never gets there within `--max-seconds` gives a lower bound, printed as ">=").

    python -m bench.time_to_icl [--recipes adopted garg cosine_b64] [--tasks dense sparse mixture] \\
        [--seeds 0 1 2] [--variant 'NAME:train.lr=1e-3;model.layout=y_channel' ...] [--json OUT]

The adopted recipe is the one the CPU twins ship: the `model`/`train` sections of sweeps/mixture_weights_cpu.yaml.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from icl_core.config import ConfigError, parse_override, parse_yaml, set_dotted, validate_run_config
from icl_core.evaluate import estimator_predictors, evaluate_predictors, task_seed
from icl_core.families import build_mixture, sample_prompts
from icl_core.train import load_model, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHIPPED = ROOT / "sweeps" / "mixture_weights_cpu.yaml"
DIM, POINTS = 5, 11
EVAL_PROMPTS, EVAL_SEED = 1024, 2024
THRESHOLDS = (0.1, 0.05)
FINAL_ESTIMATORS = ("ols", "lasso", "bayes_task")

TASKS: dict[str, list[dict[str, Any]]] = {
    "dense": [{"family": "linear", "weight": 1.0}],
    "sparse": [{"family": "sparse_linear", "nnz": 1, "weight": 1.0}],
    "mixture": [{"family": "linear", "weight": 0.5}, {"family": "sparse_linear", "nnz": 1, "weight": 0.5}],
}
# The comparators, fixed here so they stay what they were: Garg et al.'s training (batch 64, Adam at lr 1e-4
# constant) and the recipe the CPU twins shipped before this benchmark (batch 64, lr 1e-3 cosine, 500 warm-up).
COMPARATORS: dict[str, dict[str, Any]] = {
    "garg": {"model": {"n_layer": 3, "n_head": 4, "n_embd": 64},
             "train": {"steps": 100_000, "batch_size": 64, "lr": 1.0e-4, "schedule": "constant"}},
    "cosine_b64": {"model": {"n_layer": 3, "n_head": 4, "n_embd": 64},
                   "train": {"steps": 6000, "batch_size": 64, "lr": 1.0e-3, "schedule": "cosine",
                             "warmup_steps": 500}},
}


def shipped_recipe() -> dict[str, Any]:
    """The `model` and `train` sections the CPU twins ship."""
    base = parse_yaml(SHIPPED.read_text())["base"]
    return {"model": base["model"], "train": base["train"]}


def recipes(names: list[str], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Named recipes; a variant `NAME:key=value;key=value` is the adopted recipe with those overrides."""
    known = {"adopted": shipped_recipe(), **COMPARATORS}
    out = {}
    for name in names:
        if name not in known:
            raise SystemExit(f"--recipes: unknown recipe {name!r} (known: {', '.join(known)})")
        out[name] = known[name]
    for v in variants:
        name, _, sets = v.partition(":")
        recipe = copy.deepcopy(known["adopted"])
        for item in filter(None, (s.strip() for s in sets.split(";"))):
            key, value = parse_override(item)
            # the data are the benchmark's, the same for every recipe; only the curriculum over them is a lever
            if key.split(".")[0] not in ("model", "train") and not key.startswith("data.curriculum."):
                raise SystemExit(f"--variant {name}: {key}: a recipe sets model.*, train.* and "
                                 "data.curriculum.* keys only")
            set_dotted(recipe, key, value)
        out[name] = recipe
    return out


def run_config(recipe: dict[str, Any], task: str, seed: int, eval_every: int) -> dict[str, Any]:
    train_section = {**recipe["train"], "checkpoint_every": eval_every, "log_every": eval_every, "device": "cpu"}
    data = {**recipe.get("data", {}), "dim": DIM, "n_points": POINTS, "mixture": TASKS[task]}
    return {"seed": seed, "data": data,
            "model": recipe["model"], "train": train_section}


def held_out(task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed evaluation prompts of each family in the task, keyed by canonical id."""
    out = {}
    for comp in build_mixture(TASKS[task]).components:
        gen = torch.Generator().manual_seed(task_seed(EVAL_SEED, comp.canonical_id))
        out[comp.canonical_id] = sample_prompts(comp, EVAL_PROMPTS, POINTS, DIM, gen)
    return out


class _Budget(Exception):
    """The run's wall-time budget is spent."""


class CompetenceProbe:
    """TrainCallback: evaluates every checkpoint on the held-out prompts and times training without it."""

    def __init__(self, label: str, task: str, max_seconds: float, steps: int):
        self.label, self.steps = label, steps
        self.prompts = held_out(task)
        self.max_seconds = max_seconds
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.curve: list[dict[str, Any]] = []

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        wall = self.train_seconds()
        t0 = time.perf_counter()
        model, _ = load_model(path.parent)
        errors = {}
        for tid, (xs, ys) in self.prompts.items():
            err = (model.predict(xs, ys) - ys).square().mean(0)
            errors[tid] = float(err[DIM:].mean())
        self.curve.append({"step": step, "wall_s": round(wall, 2), "loss": metrics.get("loss"), "error": errors})
        print(f"  {self.label}: step {step}, {wall:.0f} s, error k>=d "
              + " ".join(f"{e:.3f}" for e in errors.values()), flush=True)
        self.eval_seconds += time.perf_counter() - t0
        if wall > self.max_seconds and step < self.steps:  # a run that got to its last step is not cut short
            raise _Budget


def first_reach(curve: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The first evaluation at which every family's mean error over k >= d is <= threshold."""
    for point in curve:
        if max(point["error"].values()) <= threshold:
            return {"step": point["step"], "wall_s": point["wall_s"]}
    return None


def run_one(name: str, recipe: dict[str, Any], task: str, seed: int, eval_every: int, max_seconds: float,
            threads: int) -> dict[str, Any]:
    """Train one (recipe, task, seed) and return its curve, competence times and final errors by k."""
    torch.set_num_threads(threads)
    cfg = validate_run_config(run_config(recipe, task, seed, eval_every))
    probe = CompetenceProbe(f"{name} {task} seed {seed}", task, max_seconds, cfg.train.steps)
    stopped = False
    with tempfile.TemporaryDirectory(prefix="iclmix-tti-") as out:
        try:
            train(cfg, out, callbacks=[probe], progress=False)
        except _Budget:
            stopped = True
        model, _ = load_model(out)
    final = {}
    mixture = cfg.data.family
    for comp in mixture.components:  # evaluate_predictors draws the probe's prompts again (same seed)
        predictors = {"model": model.predict, **estimator_predictors(FINAL_ESTIMATORS, comp, mixture, 0.0)}
        rows = evaluate_predictors(predictors, [comp], dim=DIM, n_points=POINTS, n_prompts=EVAL_PROMPTS,
                                   seed=EVAL_SEED)
        final[comp.canonical_id] = {est: [r.error for r in rows if r.estimator == est] for est in predictors}
    last = probe.curve[-1]
    return {"recipe": name, "task": task, "seed": seed, "stopped_at_budget": stopped, "threads": threads,
            "steps": last["step"], "train_seconds": last["wall_s"], "curve": probe.curve,
            "reach": {str(t): first_reach(probe.curve, t) for t in THRESHOLDS}, "final_by_k": final}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], max_seconds: float) -> list[dict[str, Any]]:
    """Medians over seeds per (recipe, task): steps and seconds to each threshold, final error at k >= d."""
    out = []
    for (name, task) in sorted({(r["recipe"], r["task"]) for r in runs}):
        group = [r for r in runs if r["recipe"] == name and r["task"] == task]
        row: dict[str, Any] = {"recipe": name, "task": task, "seeds": len(group),
                               "stopped_at_budget": sum(r["stopped_at_budget"] for r in group)}
        for t in THRESHOLDS:
            got = [r["reach"][str(t)] for r in group]
            # A run that never got there counts as its budget, so the median is a lower bound ("reached" says so).
            row[f"reached_{t}"] = sum(g is not None for g in got)
            row[f"seconds_to_{t}"] = _median([g["wall_s"] if g else max(max_seconds, r["train_seconds"])
                                              for g, r in zip(got, group, strict=True)])
            row[f"steps_to_{t}"] = _median([g["step"] for g in got if g]) if all(got) else None
        row["final_model_k_ge_d"] = _median([max(statistics.fmean(v["model"][DIM:]) for v in r["final_by_k"].values())
                                            for r in group])
        row["final_ols_k_ge_d"] = _median([max(statistics.fmean(v["ols"][DIM:]) for v in r["final_by_k"].values())
                                          for r in group])
        out.append(row)
    return out


SPECIALIST = {"linear": "dense", "sparse_linear(nnz=1)": "sparse"}


def mixture_vs_specialists(runs: list[dict[str, Any]], rel_tol: float = 0.15, abs_tol: float = 0.02
                           ) -> list[dict[str, Any]]:
    """Per recipe and family: is the 50/50 mixture model within max(abs_tol, rel_tol x specialist) of the
    specialist (the model trained on that family alone) at every k? Final errors, medians over seeds."""
    out = []
    for name in sorted({r["recipe"] for r in runs}):
        mine = [r for r in runs if r["recipe"] == name]
        mixed = [r for r in mine if r["task"] == "mixture"]
        for fam, task in SPECIALIST.items():
            special = [r for r in mine if r["task"] == task]
            if not mixed or not special:
                continue
            n = len(mixed[0]["final_by_k"][fam]["model"])
            m = [statistics.median(r["final_by_k"][fam]["model"][k] for r in mixed) for k in range(n)]
            sp = [statistics.median(r["final_by_k"][fam]["model"][k] for r in special) for k in range(n)]
            over = [k for k in range(n) if m[k] > sp[k] + max(abs_tol, rel_tol * sp[k])]
            worst = max(range(n), key=lambda k: m[k] - sp[k] - max(abs_tol, rel_tol * sp[k]))
            out.append({"recipe": name, "family": fam, "ok": not over, "over_at_k": over, "worst_k": worst,
                        "mixture": round(m[worst], 4), "specialist": round(sp[worst], 4),
                        "mixture_by_k": [round(v, 4) for v in m], "specialist_by_k": [round(v, 4) for v in sp]})
    return out


def ratios(summary: list[dict[str, Any]], base: str, against: list[str]) -> list[dict[str, Any]]:
    """Wall time to competence of each comparator over `base`'s, per task and threshold (">=" when a bound)."""
    by = {(s["recipe"], s["task"]): s for s in summary}
    out = []
    for other in against:
        for task in sorted({s["task"] for s in summary}):
            a, b = by.get((base, task)), by.get((other, task))
            if not a or not b:
                continue
            for t in THRESHOLDS:
                if not a[f"reached_{t}"] == a["seeds"]:
                    continue
                lower_bound = b[f"reached_{t}"] < b["seeds"]
                out.append({"recipe": base, "against": other, "task": task, "threshold": t,
                            "ratio": round(b[f"seconds_to_{t}"] / a[f"seconds_to_{t}"], 2),
                            "lower_bound": lower_bound})
    return out


def format_summary(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'recipe':<22}{'task':<9}{'seeds':>6}{'s to 0.1':>11}{'s to 0.05':>11}{'steps 0.05':>11}"
             f"{'final k>=d':>12}{'cut':>5}"]
    for s in summary:
        cells = [("" if s[f"reached_{t}"] == s["seeds"] else ">=") + f"{s[f'seconds_to_{t}']:.0f}" for t in THRESHOLDS]
        steps = s["steps_to_0.05"]
        lines.append(f"{s['recipe']:<22}{s['task']:<9}{s['seeds']:>6}{cells[0]:>11}{cells[1]:>11}"
                     f"{'-' if steps is None else f'{steps:.0f}':>11}{s['final_model_k_ge_d']:>12.4f}"
                     f"{s['stopped_at_budget']:>5}")
    lines.append("(cut: runs the wall-time budget stopped before their last step; their final errors are earlier ones)")
    return "\n".join(lines)


def format_final(runs: list[dict[str, Any]], recipe: str) -> str:
    """The recipe's final error by k per task and family: the model against each baseline, medians over seeds."""
    lines = []
    for task in TASKS:
        group = [r for r in runs if r["recipe"] == recipe and r["task"] == task]
        for fam in (group[0]["final_by_k"] if group else {}):
            lines.append(f"{recipe} on {task}, eval {fam}, final error by k = 0 … {POINTS - 1}:")
            for est in ("model", *FINAL_ESTIMATORS):
                by_k = [statistics.median(r["final_by_k"][fam][est][k] for r in group) for k in range(POINTS)]
                lines.append(f"  {est:<11}" + " ".join(f"{v:6.3f}" for v in by_k))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.time_to_icl", description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=["adopted", "garg", "cosine_b64"])
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value;key=value on the adopted recipe")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--comparator-tasks", nargs="+", default=["dense"], choices=list(TASKS),
                   help="tasks the comparators run on (default dense: the target's task)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--max-seconds", type=float, default=700.0,
                   help="training wall-time budget per run (the adopted recipe's 4 000 steps take ~560 s)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (a sweep runs one trial per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--json", default=str(RESULTS / "time-to-icl.json"))
    p.add_argument("--report", action="store_true",
                   help="train nothing: print the tables of the --json file again, its derived figures recomputed")
    a = p.parse_args(argv)
    if a.report:
        res = json.loads(Path(a.json).read_text())
        report(res)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    chosen = recipes(a.recipes, a.variant)
    if not chosen:
        raise SystemExit("--recipes/--variant: name at least one recipe")
    jobs = [(name, recipe, task, seed)
            for name, recipe in chosen.items()
            for task in (a.comparator_tasks if name in COMPARATORS else a.tasks)
            for seed in a.seeds]
    for name, recipe, task, seed in jobs:  # a bad variant stops here, before hours of training
        try:
            validate_run_config(run_config(recipe, task, seed, a.eval_every))
        except ConfigError as e:
            raise SystemExit(f"recipe {name}: {e}") from None
    started = time.time()
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, name, recipe, task, seed, a.eval_every, a.max_seconds, a.threads)
                   for name, recipe, task, seed in jobs]
        failed = []
        for i, fut in enumerate(as_completed(futures), 1):
            try:
                r = fut.result()
            except Exception as e:  # noqa: BLE001 (one diverging run must not lose the others' hours)
                failed.append(repr(e))
                print(f"[{i}/{len(jobs)}] a run failed: {e!r}", flush=True)
                continue
            runs.append(r)
            reach = r["reach"]["0.05"]
            got = f"<= 0.05 at step {reach['step']}, {reach['wall_s']:.0f} s" if reach else "not <= 0.05"
            print(f"[{i}/{len(jobs)}] {r['recipe']} {r['task']} seed {r['seed']}: {got}; "
                  f"final error k>=d {max(statistics.fmean(v['model'][DIM:]) for v in r['final_by_k'].values()):.4f} "
                  f"after {r['steps']} steps, {r['train_seconds']:.0f} s", flush=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python -m bench.time_to_icl " +
           " ".join(argv if argv is not None else sys.argv[1:]), "torch": torch.__version__,
           "jobs": a.jobs, "threads": a.threads, "max_seconds": a.max_seconds, "eval_every": a.eval_every,
           "eval_prompts": EVAL_PROMPTS, "recipes": chosen, "seconds": round(time.time() - started, 1),
           "failed": failed,
           "runs": sorted(runs, key=lambda r: (r["recipe"], r["task"], r["seed"]))}
    report(res)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if failed else 0


def report(res: dict[str, Any]) -> None:
    """Derive the summary, ratios and mixture gaps from the runs into `res`, and print them."""
    runs, names = res["runs"], list(res["recipes"])
    base = "adopted" if "adopted" in names else names[0]
    res["summary"] = summarize(runs, res["max_seconds"])
    res["ratios"] = ratios(res["summary"], base, [n for n in names if n != base])
    res["mixture_vs_specialists"] = mixture_vs_specialists(runs)
    print(format_final(runs, base))
    print(format_summary(res["summary"]))
    for r in res["ratios"]:
        print(f"{r['against']} / {r['recipe']} on {r['task']}, wall time to {r['threshold']}: "
              f"{'>=' if r['lower_bound'] else ''}{r['ratio']}x")
    for g in res["mixture_vs_specialists"]:
        print(f"{g['recipe']}: 50/50 mixture on {g['family']} within max(0.02, 15 %) of its specialist at every k: "
              f"{'yes' if g['ok'] else 'no, over at k = ' + str(g['over_at_k'])}; worst k = {g['worst_k']}: "
              f"{g['mixture']:.4f} against {g['specialist']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
