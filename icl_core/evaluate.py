"""Evaluation: the model and every estimator on the same prompts, as a tidy table.

One row per (task, k, estimator): the mean normalized squared error after k in-context examples and
its 90 % bootstrap interval (Garg et al.: 1 280 prompts, 1 000 resamples). Families are scaled to unit
variance, so the normalized error is the plain squared error and the zero predictor scores about 1.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import RunConfig
from .estimators import REGISTRY
from .families import Family, sample_prompts
from .model import ICLTransformer

EVAL_CSV = "eval.csv"
EVAL_FIELDS = ("task", "k", "estimator", "error", "ci_low", "ci_high", "n_prompts")
N_BOOTSTRAP = 1000
MODEL_BATCH = 256


@dataclass(frozen=True)
class EvalRow:
    task: str
    k: int
    estimator: str
    error: float
    ci_low: float
    ci_high: float
    n_prompts: int


Predictor = Callable[[Tensor, Tensor], Tensor]


def task_seed(seed: int, task_id: str) -> int:
    """Prompts depend only on the eval seed and the task, so every run of a sweep sees the same prompts."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}".encode()).digest()[:7], "big")


def bootstrap_counts(n_prompts: int, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """How often each prompt is drawn in each resample, (n_boot, n_prompts)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_boot).astype(np.float64)


def bootstrap_mean_ci(errors: np.ndarray, counts: np.ndarray | None = None, level: float = 0.9):
    """errors: (n_prompts, K) -> mean, low, high, each (K,), resampling prompts (one matmul)."""
    if counts is None:
        counts = bootstrap_counts(errors.shape[0])
    means = counts @ errors / errors.shape[0]  # (n_boot, K)
    tail = 100 * (1 - level) / 2
    return errors.mean(axis=0), np.percentile(means, tail, axis=0), np.percentile(means, 100 - tail, axis=0)


def model_predictor(model: ICLTransformer, device: torch.device | str = "cpu") -> Predictor:
    """The model's predict, run in batches on its device."""

    def predict(xs: Tensor, ys: Tensor) -> Tensor:
        outs = []
        for i in range(0, xs.shape[0], MODEL_BATCH):
            outs.append(model.predict(xs[i : i + MODEL_BATCH].to(device), ys[i : i + MODEL_BATCH].to(device)).cpu())
        return torch.cat(outs).to(ys.dtype)

    return predict


def estimator_predictors(
    names: Iterable[str], task: Family, pretrain: Family | None, noise_std: float
) -> dict[str, Predictor]:
    """The registry's estimators by their table names, those that apply (the model is added by the caller)."""
    out: dict[str, Predictor] = {}
    for name in names:
        make = REGISTRY[name].make
        estimator = make(task, pretrain, noise_std) if make is not None else None
        if estimator is not None:
            out[name] = estimator.predict
    return out


def evaluate_predictors(
    predictors: dict[str, Predictor],
    tasks: Sequence[Family],
    *,
    dim: int,
    n_points: int,
    n_prompts: int,
    noise_std: float = 0.0,
    seed: int = 12345,
    make_predictors: Callable[[Family], dict[str, Predictor]] | None = None,
    progress: bool = False,
) -> list[EvalRow]:
    """Draw `n_prompts` prompts per task and score every predictor on the same ones."""
    rows: list[EvalRow] = []
    bar = _bar(len(tasks), progress)
    for task in tasks:
        tid = task.canonical_id
        gen = torch.Generator().manual_seed(task_seed(seed, tid))
        xs, ys = sample_prompts(task, n_prompts, n_points, dim, gen, noise_std)
        xs, ys = xs.double(), ys.double()
        counts = bootstrap_counts(n_prompts, seed=task_seed(seed, tid) % 2**32)  # shared: paired CIs
        per_task = dict(predictors)
        if make_predictors is not None:
            per_task.update(make_predictors(task))
        for name, predict in per_task.items():
            if bar is not None:
                bar.set_postfix_str(f"{tid} {name}", refresh=True)
            pred = predict(xs, ys)
            errors = (pred.double() - ys).square().cpu().numpy()  # (n_prompts, n_points)
            mean, low, high = bootstrap_mean_ci(errors, counts)
            rows.extend(
                EvalRow(tid, k, name, float(mean[k]), float(low[k]), float(high[k]), n_prompts)
                for k in range(n_points)
            )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def evaluate_run(
    model: ICLTransformer,
    cfg: RunConfig,
    *,
    tasks: Sequence[Family] | None = None,
    n_prompts: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[EvalRow]:
    """Evaluate a trained model as its config's eval section says (tasks and n_prompts may be overridden)."""
    ev = cfg.evaluation
    names = list(ev.estimators)
    noise = cfg.data.noise_std
    pretrain = cfg.data.family
    predictors: dict[str, Predictor] = {}
    if "model" in names:
        predictors["model"] = model_predictor(model, device)
    return evaluate_predictors(
        predictors,
        list(tasks) if tasks is not None else cfg.eval_tasks(),
        dim=cfg.data.dim,
        n_points=cfg.eval_points,
        n_prompts=n_prompts or ev.n_prompts,
        noise_std=noise,
        seed=ev.seed,
        make_predictors=lambda task: estimator_predictors(
            [n for n in names if n != "model"], task, pretrain, noise
        ),
        progress=progress,
    )


def write_eval_csv(rows: Iterable[EvalRow], path: str | Path) -> Path:
    """Write the tidy table atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(EVAL_FIELDS)
        for r in rows:
            w.writerow([r.task, r.k, r.estimator, repr(r.error), repr(r.ci_low), repr(r.ci_high), r.n_prompts])
    tmp.replace(path)
    return path


def summarize(rows: Iterable[EvalRow], estimator: str = "model") -> dict[str, float]:
    """Scalar summaries for tracking: `eval_loss` is the estimator's error averaged over tasks and k."""
    by_task: dict[str, list[float]] = {}
    for r in rows:
        if r.estimator == estimator and math.isfinite(r.error):
            by_task.setdefault(r.task, []).append(r.error)
    out = {f"eval/{task}": float(np.mean(v)) for task, v in by_task.items()}
    if by_task:
        out["eval_loss"] = float(np.mean([np.mean(v) for v in by_task.values()]))
    return out


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="task", dynamic_ncols=True)
