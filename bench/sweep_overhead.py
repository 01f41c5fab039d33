"""Sweep overhead: short trials through `iclmix sweep run` (Ray Tune + MLflow) against the same trials run back to
back in one process (train, evaluate, write the run folder), at two sweep sizes.

The per-trial overhead is measured two ways: from the trials' own MLflow runs (first start to last end,
per trial, minus a back-to-back trial: MLflow logging, checkpoints, Tune reports and scheduling between
trials), and as the slope ((tune(N2) - tune(N1)) - (direct(N2) - direct(N1))) / (N2 - N1). The fixed cost
(Ray and MLflow start-up and shutdown, the parent run) is the rest. Trials ask for every CPU, so Ray runs
them one at a time like the comparator does; the comparator is warmed up first.

    python -m bench.sweep_overhead [--sizes 2 12] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).resolve().parent / "results"


def sweep_file(root: Path, n: int, steps: int, cpus: int) -> Path:
    """A sweep of `n` tiny trials (seeds 0..n-1) on a d = 2 linear task."""
    spec = {
        "name": f"overhead{n}",
        "base": {
            "data": {"dim": 2, "n_points": 6, "mixture": [{"family": "linear"}]},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
            "train": {"steps": steps, "batch_size": 32, "lr": 1.0e-3, "checkpoint_every": max(1, steps // 2),
                      "log_every": 10},
            "eval": {"n_prompts": 128, "estimators": ["model", "ols"], "tasks": [{"family": "linear"}]},
        },
        "seeds": list(range(n)),
        "resources": {"cpu": cpus, "gpu": 0},
    }
    path = root / f"overhead{n}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def direct(path: Path, out: Path, threads: int) -> float:
    """The sweep's trials back to back in this process: train, evaluate, write eval.csv. Seconds."""
    from icl_core.evaluate import evaluate_run, write_eval_csv
    from icl_core.train import train
    from sweeps.spec import load_sweep

    torch.set_num_threads(threads)
    _, trials = load_sweep(path)
    start = time.perf_counter()
    for t in trials:
        run_dir = out / t.hash
        result = train(t.config, run_dir, progress=False)
        write_eval_csv(evaluate_run(result.model, t.config), run_dir / "eval.csv")
    return time.perf_counter() - start


def tuned(path: Path, storage: Path) -> float:
    """`iclmix sweep run` in a fresh process (private Ray, private MLflow server). Seconds, start to exit."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "iclmix", "sweep", "run", str(path), "--storage", str(storage)],
                          env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"sweep run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return took


def trial_span(storage: Path, name: str) -> float:
    """Seconds from the first trial's start to the last trial's end, from the sweep's MLflow runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / name / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`iclmix.role` = 'trial'")
    return (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000


def run(sizes: tuple[int, int] = (2, 12), steps: int = 100) -> dict:
    cpus = os.cpu_count() or 1
    out: dict = {"sizes": list(sizes), "steps": steps, "cpus_per_trial": cpus, "runs": []}
    with tempfile.TemporaryDirectory(prefix="iclmix-overhead-") as tmp:
        root = Path(tmp)
        direct(sweep_file(root, 1, steps, cpus), root / "warmup", cpus)  # imports, allocator, kernels
        for n in sizes:
            path = sweep_file(root, n, steps, cpus)
            d = direct(path, root / f"direct{n}", cpus)
            t = tuned(path, root / "storage")
            span = trial_span(root / "storage", f"overhead{n}")
            out["runs"].append({"trials": n, "direct_s": round(d, 2), "tune_s": round(t, 2),
                                "trials_span_s": round(span, 2)})
    (a, b) = out["runs"]
    slope = ((b["tune_s"] - a["tune_s"]) - (b["direct_s"] - a["direct_s"])) / (b["trials"] - a["trials"])
    out["direct_per_trial_s"] = round(b["direct_s"] / b["trials"], 2)
    out["per_trial_overhead_s"] = round((b["trials_span_s"] - b["direct_s"]) / b["trials"], 2)
    out["per_trial_overhead_slope_s"] = round(slope, 2)
    out["fixed_overhead_s"] = round(b["tune_s"] - b["trials_span_s"], 2)
    return out


def format_table(res: dict) -> str:
    lines = ["sweep overhead (trials one at a time)",
             f"{'trials':>7} {'back-to-back s':>15} {'sweep run s':>12} {'trials in MLflow s':>19}"]
    lines += [f"{r['trials']:>7} {r['direct_s']:>15.1f} {r['tune_s']:>12.1f} {r['trials_span_s']:>19.1f}"
              for r in res["runs"]]
    lines.append(f"per-trial overhead {res['per_trial_overhead_s']:.2f} s (target <= 3 s; slope estimate "
                 f"{res['per_trial_overhead_slope_s']:.2f} s); a trial itself {res['direct_per_trial_s']:.2f} s; "
                 f"fixed start-up and shutdown {res['fixed_overhead_s']:.1f} s per sweep run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweep_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs=2, type=int, default=[2, 12], help="the two sweep sizes (trials)")
    p.add_argument("--steps", type=int, default=100, help="training steps per trial")
    p.add_argument("--out", default=str(RESULTS / "sweep-overhead.json"))
    a = p.parse_args(argv)
    if not 0 < a.sizes[0] < a.sizes[1]:
        p.error("--sizes needs two increasing positive counts")
    res = {"date": time.strftime("%Y-%m-%d"), "command": "python -m bench.sweep_overhead " + " ".join(argv or []),
           **run(tuple(a.sizes), a.steps)}
    print(format_table(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
