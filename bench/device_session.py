"""One call on a lent GPU (`device`): the bundle benchmark, then finding 1's paper-shaped twin through the product.

Stages, each writing under --out as it ends (a call cut short still brings back what it measured):
1. `bench.gpu`: one graph-replayed trial, bundles of 1, 4, 16 and 32 and 4 packed eager trials (steps/s, MFU,
   memory) -> gpu-bundles.json.
2. The twin's bundle timed on this GPU (`icl_core.bundle.train_bundle`, its own configs), and its train.steps
   (with the curriculum and the decay) rescaled to the seconds left -> twin.yaml.
3. `iclmix sweep run twin.yaml`, then `analyze check`, `heatmap`, `curves`, `report` and `export` ->
   twin-check.txt, twin-frame.csv, twin-figures.tar.gz; device-session.json says what each stage took.

On the device, with the packages of `python -m bench.device_wheels` carried in .devsite:

    mkdir -p /tmp/site && tar -xJf .devsite/site.tar.xz -C /tmp/site && PYTHONPATH=/tmp/site:$PWD \
    PYTHONUNBUFFERED=1 python3 -m bench.device_session --out $OUT 2>&1 | tee $OUT/session.log

    python -m bench.device_session --tiny --out DIR     # every stage at tiny size on CPU (tests)
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TWIN = ROOT / "sweeps" / "mixture_weights_gpu.yaml"
BENCH_ARGS = ["--variants", "eager", "loop_graph", "bundle_1", "bundle_4", "bundle_16", "bundle_32",
              "--share-variant", "eager", "--trials", "4", "--repeats", "1", "--steps", "100"]
GRACE_S = 45  # past the budget, for the analysis: the device call's timeout is the budget + 60 s
TINY_BENCH_ARGS = ["--tiny", "--device", "cpu", "--variants", "eager", "bundle_1", "bundle_2", "--trials", "2"]
# The twin at tiny size: the same file and stages on a CPU in about a minute.
TINY = {"data": {"dim": 3, "n_points": 7, "curriculum": None}, "model": {"n_layer": 1, "n_head": 2, "n_embd": 16},
        "train": {"batch_size": 16, "device": "cpu"}, "eval": {"n_prompts": 64}}


def rescale(sweep: dict, steps: int) -> dict:
    """The sweep with train.steps = `steps`: warm-up, decay, checkpoints and curriculum keep their share of it."""
    out = copy.deepcopy(sweep)
    base = out["base"]
    old = base["train"]["steps"]
    train = base["train"]
    train["steps"] = steps
    train["warmup_steps"] = max(1, train.get("warmup_steps", 0) * steps // old)
    if train.get("schedule") == "wsd":
        train["decay_steps"] = max(1, train["decay_steps"] * steps // old)
    train["checkpoint_every"] = max(1, train["checkpoint_every"] * steps // old)
    train["log_every"] = min(train.get("log_every", 10), max(1, steps // 20))
    for axis in (base["data"].get("curriculum") or {}).values():
        axis["interval"] = max(1, axis["interval"] * steps // old)
    return out


def shrink(sweep: dict) -> dict:
    """The sweep at tiny size for a CPU (the --tiny smoke run)."""
    out = copy.deepcopy(sweep)
    for section, values in TINY.items():
        out["base"].setdefault(section, {}).update(values)
    if out["base"]["data"]["curriculum"] is None:
        del out["base"]["data"]["curriculum"]
    out["resources"] = {**out["resources"], "cpu": 1, "gpu": 0}
    return out


def step_seconds(sweep: dict, steps: int) -> float:
    """Seconds per step of the sweep's bundle on this machine, from its own log: step 1 to `steps`, so that
    building the models and writing checkpoints do not count."""
    from icl_core.bundle import train_bundle
    from icl_core.train import METRICS
    from sweeps.spec import expand, validate_sweep

    s = copy.deepcopy(sweep)
    s["base"]["train"].update(steps=steps, schedule="constant", warmup_steps=0, decay_steps=0,
                              checkpoint_every=steps, log_every=steps)
    s["base"]["data"].pop("curriculum", None)  # the full-size prompts: the step time the run ends with
    cfgs = [t.config for t in expand(validate_sweep(s))]
    with tempfile.TemporaryDirectory() as d:
        train_bundle(cfgs, [Path(d) / f"w{i}" for i in range(len(cfgs))], progress=False)  # CUDA's first launches
        train_bundle(cfgs, [Path(d) / f"t{i}" for i in range(len(cfgs))], progress=False)
        with open(Path(d) / "t0" / METRICS) as f:
            rows = {int(r["step"]): float(r["time_s"]) for r in csv.DictReader(f)}
    return max(1e-4, (rows[steps] - rows[1]) / (steps - 1))


def run(cmd: list[str], timeout: float) -> dict:
    """Run a stage's command (its output into ours) with a deadline, and at the deadline every process it started
    (benchmark workers, Ray, the MLflow server); its exit status and seconds."""
    t0 = time.monotonic()
    print("$ " + " ".join(cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the session's own sqlite store
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc: int | str = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        rc = "timeout"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_session", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where the results go ($OUT on the device)")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for every stage together")
    p.add_argument("--bench-s", type=float, default=120, help="the benchmark's share of them (0: no benchmark)")
    p.add_argument("--reserve-s", type=float, default=150,
                   help="seconds kept for the sweep's start, its evaluation and the analysis")
    p.add_argument("--tiny", action="store_true", help="every stage at tiny size on CPU")
    a = p.parse_args(argv)
    deadline = time.monotonic() + a.budget_s
    out, work = Path(a.out), Path(tempfile.mkdtemp(prefix="iclmix-device-"))
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "budget_s": a.budget_s, "tiny": a.tiny}

    def save() -> None:
        (out / "device-session.json").write_text(json.dumps(summary, indent=2))

    import torch

    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    py = sys.executable
    bench_args = TINY_BENCH_ARGS if a.tiny else BENCH_ARGS
    if a.bench_s > 0:  # 0: a retry whose first call brought the benchmark back
        summary["bench"] = run([py, "-m", "bench.gpu", *bench_args, "--json", str(out / "gpu-bundles.json")],
                               min(a.bench_s, deadline - time.monotonic() - a.reserve_s))
        save()

    sweep = yaml.safe_load(TWIN.read_text())
    if a.tiny:
        sweep = shrink(sweep)
    t0 = time.monotonic()
    seconds = step_seconds(sweep, 6 if a.tiny else 40)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sweep's trial is another process: leave it the card
    left = deadline - time.monotonic() - a.reserve_s
    steps = max(20 if a.tiny else 500, int(0.85 * left / seconds) // 10 * 10)
    twin = rescale(sweep, steps)
    (out / "twin.yaml").write_text(f"# {TWIN.name} rescaled by bench.device_session to the seconds it had\n"
                                   + yaml.safe_dump(twin, sort_keys=False))
    summary["twin"] = {"bundle": twin["resources"].get("bundle", 1),
                       "step_seconds": round(seconds, 5), "timing_s": round(time.monotonic() - t0, 1),
                       "train_s_planned": round(steps * seconds, 1), "steps": steps}
    save()
    print(f"twin: {seconds * 1e3:.1f} ms per bundle step; {steps} steps in the {left:.0f} s left", flush=True)

    store = work / "runs"
    summary["twin"]["sweep"] = run([py, "-m", "iclmix", "sweep", "run", str(out / "twin.yaml"), "--storage",
                                    str(store)], deadline + 15 - time.monotonic())
    save()
    uri = f"sqlite:///{store / twin['name'] / 'mlflow.db'}"
    figures = work / "figures"
    if summary["twin"]["sweep"]["rc"] not in (0, 1):  # 1: some trial failed, the others are there to look at
        shutil.rmtree(work, ignore_errors=True)
        return 1
    for name, args in [("check", ["--out", str(figures)]), ("export", ["--out", str(out / "twin-frame.csv")]),
                       ("heatmap", ["--out", str(figures)]), ("curves", ["--out", str(figures)]),
                       ("report", ["--out", str(figures)])]:  # the verdict first: the call may end any time now
        summary["twin"][name] = run([py, "-m", "iclmix", "analyze", name, "--sweep", twin["name"],
                                     "--tracking-uri", uri, *args], min(90.0, deadline + GRACE_S - time.monotonic()))
        save()
        if name == "check" and (figures / "check.txt").exists():
            (out / "twin-check.txt").write_text((figures / "check.txt").read_text())
    if figures.exists():
        with tarfile.open(out / "twin-figures.tar.gz", "w:gz") as tar:
            tar.add(figures, arcname="twin-figures")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2), flush=True)
    stages = [summary.get("bench", {"rc": 0}), summary["twin"]["sweep"], summary["twin"]["export"]]
    return 0 if all(s["rc"] == 0 for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
