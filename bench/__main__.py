"""`python -m bench`: the CPU benchmarks, a table on stdout and JSON under bench/results/.

    python -m bench [--quick] [--levers] [--no-eval] [--threads 1] [--out bench/results/cpu-latest.json]

Training speed of our step against Garg et al.'s (HF GPT2Model, default sdpa attention and the 2022-era
eager attention) at the small (4 x 64) and paper (12 x 256) sizes, with MFU against torch.mm measured in
the same run; then on two cores, each contender in a process of its own (our `train.batch_threads: 2` step
against HF at 1 and 2 threads); then the evaluation benchmark (Lasso against sklearn, a full table); `--levers` adds the
performance levers. Figures are medians over rounds that interleave the contenders step by step (see
bench/train_speed.py); run on a quiet machine for absolute numbers, the ratios hold up under load.
`make bench` installs the `bench` extra and runs this. Results and their meaning: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import train_speed

RESULTS = Path(__file__).resolve().parent / "results"
# Two cores: ours on one core, on two by intra-op threads and on two by batch_threads; HF on one and on two.
TWO_CORES = ["ours", "ours@2", "batch_threads_2", "hf_gpt2", "hf_gpt2@2"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 rounds and fewer steps (a smoke run, minutes)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per comparison (default 5; 3 with --quick)")
    p.add_argument("--sizes", nargs="+", default=["small", "paper"], choices=sorted(train_speed.SIZES))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: per-core figures that hold up on a shared machine)")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our step with train.compile, as the paper-scale sweeps train (on by default)")
    p.add_argument("--two-cores", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                   help="also compare on two cores, each contender in its own process: our step with "
                        "train.batch_threads: 2 against HF at 1 and 2 threads (on by default with 2+ cores)")
    p.add_argument("--levers", action="store_true", help="also time each performance lever against our default")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="the evaluation benchmark (bench.eval_speed; on by default)")
    p.add_argument("--out", default=str(RESULTS / "cpu-latest.json"), help="JSON results file")
    a = p.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("the comparator needs transformers: pip install -e '.[bench]' (or make bench)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    rounds = a.rounds or (3 if a.quick else 5)
    steps = {"small": 2, "paper": 1, "tiny": 2} if a.quick else train_speed.STEPS
    started = time.time()
    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": train_speed.machine(),
        "rounds": rounds,
        "train": [train_speed.compare_size(s, rounds, steps[s], eager=True, compiled=a.compiled) for s in a.sizes],
    }
    print(train_speed.format_table(res["train"], "wall"))
    print(train_speed.format_table(res["train"], "cpu"))
    if a.two_cores:
        res["two_cores"] = [train_speed.solo(s, TWO_CORES, rounds, steps[s] if a.quick else max(2, steps[s]))
                            for s in a.sizes]
        print(train_speed.format_table(res["two_cores"], "wall"))
    if a.levers:
        res["levers"] = [train_speed.levers(s, list(train_speed.LEVERS), rounds, steps[s]) for s in a.sizes]
        print(train_speed.format_table(res["levers"], "wall"))
        print(train_speed.format_table(res["levers"], "cpu"))
    if a.eval:
        from . import eval_speed

        res["eval"] = eval_speed.run(quick=a.quick)
        print(eval_speed.format_table(res["eval"]))
    res["seconds"] = round(time.time() - started, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
