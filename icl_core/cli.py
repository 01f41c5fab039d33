"""`iclmix train` and `iclmix evaluate`: the single-run commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import ConfigError, load_run_config


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model from a run config")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--out", required=True, help="run directory (config.yaml, metrics.csv, checkpoint.pt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=1000 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = load_run_config(args.config, args.overrides)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(f"trained {result.step} steps, final loss {result.final_loss:.4f}")
    print(f"run directory: {out}")
    return 0
