"""Evaluation speed: our batched Lasso against scikit-learn's, and the cost of a full evaluation table.

Lasso: `icl_core.baselines.Lasso(alpha=0.01)` solves every prefix of every prompt at once; the reference is
Garg et al.'s baseline, sklearn `Lasso(alpha=0.01, fit_intercept=False)` fitted one prompt x prefix at a
time. sklearn runs on a subset of the prompts (its time is linear in them) and is reported per prompt;
ours runs on the subset (which also warms it up) and on all prompts, the median of 3 runs. The largest
prediction difference is over the subset.

Full table: `icl_core.evaluate.evaluate_predictors` with every classical and Bayes estimator (no model) on
`n_prompts` prompts of 41 points at d = 20, for the tasks dense linear and sparse linear (nnz = 2), with
the 50/50 mixture of the two as the pretraining prior; the time of each estimator is reported too.

    python -m bench.eval_speed [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from icl_core.families import Linear, Mixture, SparseLinear, sample_prompts

DIM, POINTS, PROMPTS = 20, 41, 1280


def sklearn_lasso(xs: np.ndarray, ys: np.ndarray, alpha: float = 0.01, **kw) -> np.ndarray:
    """Garg et al.'s Lasso baseline: one sklearn fit per prompt and prefix (their max_iter=100000, sklearn's
    default tol=1e-4 unless given); position 0 predicts 0."""
    from sklearn.linear_model import Lasso

    kw = {"max_iter": 100_000, **kw}
    b, n, _ = xs.shape
    out = np.zeros((b, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on the tiniest prefixes
        for j in range(b):
            for i in range(1, n):
                model = Lasso(alpha=alpha, fit_intercept=False, **kw).fit(xs[j, :i], ys[j, :i])
                out[j, i] = model.predict(xs[j, i : i + 1])[0]
    return out


def lasso(n_prompts: int = PROMPTS, sklearn_prompts: int = 32, seed: int = 0) -> dict:
    import sklearn.linear_model  # noqa: F401 (imported before the clock starts)

    from icl_core.baselines import Lasso

    gen = torch.Generator().manual_seed(seed)
    xs, ys = sample_prompts(SparseLinear(nnz=2), n_prompts, POINTS, DIM, gen)
    xs, ys = xs.double(), ys.double()
    ours = Lasso(alpha=0.01)
    sub = slice(0, sklearn_prompts)
    t0 = time.perf_counter()
    theirs = sklearn_lasso(xs[sub].numpy(), ys[sub].numpy())
    t_sk = time.perf_counter() - t0
    t0 = time.perf_counter()
    mine_sub = ours.predict(xs[sub], ys[sub]).numpy()
    t_sub = time.perf_counter() - t0
    runs = []  # the subset call above warms the solver up; the median of 3 is its steady state, as in training
    for _ in range(3):
        t0 = time.perf_counter()
        ours.predict(xs, ys)
        runs.append(time.perf_counter() - t0)
    t_all = statistics.median(runs)
    tight = sklearn_lasso(xs[sub].numpy(), ys[sub].numpy(), tol=1e-10, max_iter=1_000_000)
    return {
        "task": "sparse_linear(nnz=2)",
        "points": POINTS,
        "dim": DIM,
        "sklearn_prompts": sklearn_prompts,
        "sklearn_s_per_prompt": t_sk / sklearn_prompts,
        "ours_s_per_prompt_subset": t_sub / sklearn_prompts,
        "ours_prompts": n_prompts,
        "ours_s_per_prompt": t_all / n_prompts,
        "ours_s_all_prompts_runs": runs,
        "speedup": (t_sk / sklearn_prompts) / (t_all / n_prompts),
        "speedup_same_subset": t_sk / t_sub,
        "max_abs_prediction_diff": float(np.abs(mine_sub - theirs).max()),
        "max_abs_prediction_diff_k_ge_d": float(np.abs(mine_sub - theirs)[:, DIM:].max()),
        "max_abs_prediction_diff_vs_sklearn_tol_1e-10": float(np.abs(mine_sub - tight).max()),
        "sklearn_seconds_for_all_prompts_est": t_sk / sklearn_prompts * n_prompts,
    }


def full_table(n_prompts: int = PROMPTS, seed: int = 12345) -> dict:
    from icl_core.estimators import ESTIMATORS
    from icl_core.evaluate import estimator_predictors, evaluate_predictors

    tasks = [Linear(), SparseLinear(nnz=2)]
    pretrain = Mixture(tuple(tasks), (0.5, 0.5))
    names = [e for e in ESTIMATORS if e != "model"]
    per_estimator: dict[str, float] = {}

    def timed(name, fn):
        def predict(xs, ys):
            t0 = time.perf_counter()
            out = fn(xs, ys)
            per_estimator[name] = per_estimator.get(name, 0.0) + time.perf_counter() - t0
            return out

        return predict

    def make(task):
        return {n: timed(n, f) for n, f in estimator_predictors(names, task, pretrain, 0.0).items()}

    t0 = time.perf_counter()
    rows = evaluate_predictors({}, tasks, dim=DIM, n_points=POINTS, n_prompts=n_prompts, seed=seed,
                               make_predictors=make)
    total = time.perf_counter() - t0
    return {"tasks": [t.canonical_id for t in tasks], "estimators": names, "n_prompts": n_prompts,
            "points": POINTS, "dim": DIM, "rows": len(rows), "seconds": total,
            "seconds_per_estimator": per_estimator}


def run(quick: bool = False) -> dict:
    n = 256 if quick else PROMPTS
    return {"lasso": lasso(n, 8 if quick else 32), "full_table": full_table(n)}


def format_table(res: dict) -> str:
    la, ft = res["lasso"], res["full_table"]
    by_time = sorted(ft["seconds_per_estimator"].items(), key=lambda kv: -kv[1])
    runs = ", ".join(f"{t / la['ours_prompts'] * 1e3:.3f}" for t in la["ours_s_all_prompts_runs"])
    lines = [
        f"Lasso (alpha=0.01), {la['points']} points, d={la['dim']}, {la['task']}:",
        f"  sklearn, one fit per prompt x prefix: {la['sklearn_s_per_prompt'] * 1e3:9.2f} ms/prompt"
        f" ({la['sklearn_prompts']} prompts; est. {la['sklearn_seconds_for_all_prompts_est']:.0f} s"
        f" for {la['ours_prompts']})",
        f"  icl_core batched:                     {la['ours_s_per_prompt'] * 1e3:9.3f} ms/prompt"
        f" ({la['ours_prompts']} prompts, median of {runs})"
        f"  -> {la['speedup']:.0f}x"
        f" ({la['speedup_same_subset']:.0f}x on the same {la['sklearn_prompts']})",
        f"  largest |prediction difference|: {la['max_abs_prediction_diff']:.2e} (k >= d:"
        f" {la['max_abs_prediction_diff_k_ge_d']:.2e}; vs sklearn at tol=1e-10:"
        f" {la['max_abs_prediction_diff_vs_sklearn_tol_1e-10']:.2e})",
        f"Full evaluation table ({', '.join(ft['tasks'])}; {len(ft['estimators'])} estimators; "
        f"{ft['n_prompts']} prompts): {ft['seconds']:.1f} s",
        "  " + ", ".join(f"{k} {v:.1f}s" for k, v in by_time),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_speed", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "eval-speed.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.quick)
    print(format_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
