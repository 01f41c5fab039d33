"""`make demo`: run the quickstart sweep on local Ray with MLflow in a sqlite file, then draw its heatmap."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run() -> int:
    sweep = ROOT / "sweeps" / "quickstart.yaml"
    runs = ROOT / "runs"
    store = runs / "quickstart"
    # Resume and extend are the same command: a second `make demo` skips the finished trials.
    status = main(["sweep", "run", str(sweep), "--storage", str(runs)])
    if status:
        return status
    figures = store / "figures"
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if "analyze" in commands:
        for what in ("heatmap", "report"):
            status = main(["analyze", what, "--sweep", "quickstart", "--out", str(figures)])
            if status:
                return status
    print("\nquickstart outputs:")
    for path in sorted(figures.glob("*")) if figures.exists() else []:
        print(f"  {path}")
    print(f"  MLflow store: {store / 'mlflow.db'}")
    print(f"browse the runs: mlflow ui --backend-store-uri sqlite:///{store / 'mlflow.db'} --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(run())
