"""GPU checks of the sweep path, for a machine with a CUDA GPU: trials packed on one GPU and their memory caps.

    python -m bench.gpu_checks [--sweep sweeps/gpu_packing.yaml] [--storage DIR] [--json OUT]

1. `iclmix sweep run` on the sweep file (four trials at `resources.gpu: 0.25`): the real CLI, a private local
   Ray runtime and MLflow in a sqlite file under DIR (a fresh temporary folder by default).
2. Every trial read back from MLflow: status, device, Ray's GPU ids, memory fraction and cap, peak memory and
   the span it ran in; the trials must have trained on CUDA, under their cap, at the same time.
3. A fresh process capped as a 0.25 trial is (`sweeps.trial.claim_device`) must fail to allocate more than
   a quarter of the card.
Exit status 1 when a check fails, 2 when there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CAP_PROBE = """
import torch
from sweeps.trial import claim_device
device, tags = claim_device(0.25, "cuda")
total = torch.cuda.get_device_properties(device).total_memory
inside = torch.empty(int(0.20 * total), dtype=torch.uint8, device=device)  # within the cap: must succeed
del inside
try:
    torch.empty(int(0.35 * total), dtype=torch.uint8, device=device)
    print("ALLOCATED")
except torch.OutOfMemoryError as e:
    print("OOM", str(e).splitlines()[0][:200])
"""


def trials_from_mlflow(db: Path, sweep: str) -> list[dict]:
    """One dict per trial run of `sweep` in the sqlite store `db` (which must exist)."""
    if not db.exists():  # sqlite would create an empty store and report no trials
        raise FileNotFoundError(db)
    from mlflow.tracking import MlflowClient

    from sweeps import layout
    from sweeps import tracking as tr

    client = MlflowClient(f"sqlite:///{db}")
    exp_id = tr.experiment_id(client, sweep)
    rows = []
    for r in tr.find_runs(client, exp_id, sweep, "trial"):
        tags, metrics = r.data.tags, r.data.metrics
        rows.append({
            "run_id": r.info.run_id, "status": r.info.status, "hash": tags.get(layout.TAG_HASH),
            "device": tags.get(layout.TAG_DEVICE), "gpu_name": tags.get(layout.TAG_GPU_NAME),
            "gpu_ids": tags.get(layout.TAG_GPU_IDS), "fraction": tags.get(layout.TAG_GPU_FRACTION),
            "cap_gib": float(tags.get(layout.TAG_GPU_CAP_GIB, "nan")),
            "peak_gib": metrics.get("gpu/peak_memory_gib", float("nan")), "eval_loss": metrics.get("eval_loss"),
            "start": r.info.start_time / 1000, "end": (r.info.end_time or 0) / 1000,
        })
    return sorted(rows, key=lambda x: x["start"])


def max_concurrency(rows: list[dict]) -> int:
    """The most trials whose [start, end] spans overlap at one moment."""
    events = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows], key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def check(rows: list[dict], fraction: float, expected: int) -> list[str]:
    """The failed checks, as lines (empty when all pass)."""
    bad = []
    if len(rows) != expected or len({r["hash"] for r in rows}) != expected:
        bad.append(f"expected {expected} trial runs with distinct hashes, found {len(rows)}")
    for r in rows:
        name = r["run_id"][:8]
        if r["status"] != "FINISHED":
            bad.append(f"{name}: status {r['status']}")
        if not (r["device"] or "").startswith("cuda"):
            bad.append(f"{name}: trained on {r['device']}, not CUDA")
        if r["fraction"] != f"{fraction:g}":
            bad.append(f"{name}: memory fraction {r['fraction']}, not {fraction:g}")
        if not r["peak_gib"] < r["cap_gib"]:
            bad.append(f"{name}: peak {r['peak_gib']} GiB not under its cap {r['cap_gib']} GiB")
    if rows and max_concurrency(rows) < 2:
        bad.append("no two trials ran on the GPU at the same time")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default=str(ROOT / "sweeps" / "gpu_packing.yaml"))
    p.add_argument("--storage", default=None, help="the sweep's storage (default: a fresh temporary folder)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    from sweeps.layout import MLFLOW_DB, sweep_root
    from sweeps.spec import load_sweep

    if not torch.cuda.is_available():
        print("no CUDA GPU here", file=sys.stderr)
        return 2
    spec, trials = load_sweep(a.sweep)
    storage = Path(a.storage or tempfile.mkdtemp(prefix="iclmix-gpu-checks-")).resolve()
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "iclmix", "sweep", "run", a.sweep, "--storage", str(storage)],
                       cwd=ROOT, text=True, capture_output=True)
    wall = time.time() - t0
    print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
    rows = trials_from_mlflow(Path(sweep_root(spec.name, str(storage))) / MLFLOW_DB, spec.name)
    failures = ([f"sweep run exited {r.returncode}"] if r.returncode else []) + check(
        rows, spec.resources.gpu, len(trials))
    probe = subprocess.run([sys.executable, "-c", CAP_PROBE], cwd=ROOT, text=True, capture_output=True)
    probe_out = (probe.stdout.strip() or probe.stderr.strip()[-500:])
    if not probe_out.startswith("OOM"):
        failures.append(f"a process capped at 0.25 allocated 0.35 of the card: {probe_out}")

    print(f"\n{spec.name}: `iclmix sweep run` took {wall:.0f} s; {len(rows)} trials in MLflow; "
          f"at most {max_concurrency(rows)} ran at once")
    print(f"{'run':<9}{'status':<10}{'device':<8}{'gpu_ids':<8}{'fraction':<9}{'cap GiB':>8}{'peak GiB':>9}"
          f"{'eval_loss':>10}{'start s':>8}{'end s':>7}")
    for x in rows:
        print(f"{x['run_id'][:8]:<9}{x['status']:<10}{x['device']!s:<8}{x['gpu_ids']!s:<8}{x['fraction']!s:<9}"
              f"{x['cap_gib']:>8.2f}{x['peak_gib']:>9.3f}{x['eval_loss'] or float('nan'):>10.4f}"
              f"{x['start'] - t0:>8.0f}{x['end'] - t0:>7.0f}")
    print(f"cap probe (fraction 0.25, allocating 0.35 of the card): {probe_out}")
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "sweep": spec.name, "sweep_run_seconds": wall, "returncode": r.returncode, "trials": rows,
            "max_concurrency": max_concurrency(rows), "cap_probe": probe_out, "failures": failures,
        }, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
