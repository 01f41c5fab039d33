"""`iclmix sweep plan|run`."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="plan or run a sweep file on Ray Tune")
    ssub = p.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")

    plan = ssub.add_parser("plan", help="print cells, seeds, trial count and compute; runs nothing")
    plan.add_argument("file", help="sweep file (YAML)")
    plan.add_argument("--cpus", type=int, help="estimate the wall time on this many CPU cores (default: this "
                      "machine's)")
    plan.add_argument("--gpus", type=int, help="estimate the wall time on this many GPUs (default: this machine's)")
    plan.set_defaults(func=cmd_plan)

    run = ssub.add_parser("run", help="run, resume or extend a sweep (finished trials are skipped)")
    run.add_argument("file", help="sweep file (YAML)")
    run.add_argument("--address", help="Ray address to join, e.g. 'auto' on a cluster (default: private local Ray)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under the sweep's folder)")
    run.add_argument("--storage", help="folder or URI for checkpoints and Ray results (default: ./runs)")
    run.add_argument("--verbose", action="store_true", help="also show Ray's own logs and the trials' output")
    run.set_defaults(func=cmd_run)


def cmd_plan(args: argparse.Namespace) -> int:
    from icl_core.errors import ConfigError

    from .spec import load_sweep, plan_text

    for flag in ("cpus", "gpus"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 1_000_000:
            raise ConfigError(f"--{flag}", f"must be a count from 0 to 1000000, got {value}")
    spec, trials = load_sweep(args.file)
    print(plan_text(spec, trials, cpus=args.cpus, gpus=args.gpus))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_sweep

    return run_sweep(args.file, address=args.address, tracking_uri=args.tracking_uri, storage=args.storage,
                     verbose=args.verbose)
