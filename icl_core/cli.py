"""`iclmix train` and `iclmix evaluate`: the single-run commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import ConfigError, check_writable_folder


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model from a run config (and evaluate it if it has eval:)")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--out", required=True, help="run directory (config.yaml, metrics.csv, checkpoint.pt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=1000 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a trained run against every baseline; writes RUN_DIR/eval.csv")
    e.add_argument("run_dir", help="a directory written by `iclmix train`")
    e.add_argument("--tasks", help="YAML list of test families (or a mapping with tasks:); default: the run's")
    e.add_argument("--n-prompts", type=int, help="prompts per task (default: the run's eval.n_prompts)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .evaluate import EVAL_CSV, evaluate_run, write_eval_csv
    from .train import train

    cfg = load_run_config(args.config, args.overrides)
    out = Path(args.out)
    check_writable_folder(out, "--out")
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(f"trained {result.step} steps, final loss {result.final_loss:.4f}")
    if cfg.eval is not None:
        rows = evaluate_run(result.model, cfg, device=next(result.model.parameters()).device,
                            progress=not args.no_progress)
        print(f"evaluation: {write_eval_csv(rows, out / EVAL_CSV)}")
    print(f"run directory: {out}")
    return 0


def load_tasks(path: str, dim: int) -> list:
    """Test families from a YAML file: a list of specs, or a mapping with a `tasks:` list."""
    from .config import read_yaml, task_family
    data = read_yaml(path)
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}", "must be a non-empty list of family specs (or a mapping with tasks:)")
    tasks = []
    for i, spec in enumerate(data):
        try:
            fam = task_family(spec)
            fam.check(dim)
        except ConfigError as e:
            raise e.under(f"{path}: tasks[{i}]") from None
        tasks.append(fam)
    return tasks


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EVAL_CSV, evaluate_run, write_eval_csv
    from .train import CHECKPOINT, load_model

    run_dir = Path(args.run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} holds no {CHECKPOINT} (train it with `iclmix train` first)")
    if args.n_prompts is not None and args.n_prompts < 2:
        raise ConfigError("--n-prompts", f"must be at least 2, got {args.n_prompts}")
    model, cfg = load_model(run_dir)
    tasks = load_tasks(args.tasks, cfg.data.dim) if args.tasks else None
    rows = evaluate_run(model, cfg, tasks=tasks, n_prompts=args.n_prompts, progress=not args.no_progress)
    print(f"evaluation: {write_eval_csv(rows, run_dir / EVAL_CSV)}")
    return 0
