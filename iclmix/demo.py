"""`make demo`: train the example config end to end and say where everything is."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import main

ROOT = Path(__file__).resolve().parents[1]


def run() -> int:
    config = ROOT / "configs" / "example.yaml"
    out = ROOT / "runs" / "demo"
    # --resume makes the demo idempotent: a finished run is reported, an interrupted one continues.
    status = main(["train", str(config), "--out", str(out), "--resume"])
    if status:
        return status
    print("\noutputs:")
    for name in ("config.yaml", "metrics.csv", "checkpoint.pt", "eval.csv"):
        path = out / name
        if path.exists():
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
