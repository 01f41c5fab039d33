"""`make demo`: the quickstart sweep on local Ray with MLflow in a sqlite file, its heatmap, report and check."""

from __future__ import annotations

import sys
from pathlib import Path

from sweeps.layout import DEFAULT_STORAGE, MLFLOW_DB

from .cli import main

ROOT = Path(__file__).resolve().parents[1]


def run() -> int:
    """Sweep, draw, then end on the check's verdict (its exit status: 0 PASS, 1 FAIL)."""
    sweep = ROOT / "sweeps" / "quickstart.yaml"
    runs = ROOT / DEFAULT_STORAGE
    store = runs / "quickstart"
    # Resume and extend are the same command: a second `make demo` skips the finished trials.
    status = main(["sweep", "run", str(sweep), "--storage", str(runs)])
    if status:
        return status
    figures = store / "figures"
    status = main(["analyze", "report", "--sweep", "quickstart", "--out", str(figures)])  # every figure, once
    if status:
        return status
    print(f"\nquickstart outputs: {figures} (report.html and every figure), MLflow store {store / MLFLOW_DB}")
    print(f"browse the runs: mlflow ui --backend-store-uri sqlite:///{store / MLFLOW_DB} --port 5000")
    print("\ndid the models learn in context? (iclmix analyze check --sweep quickstart)")
    return main(["analyze", "check", "--sweep", "quickstart", "--out", str(figures)])


if __name__ == "__main__":
    sys.exit(run())
