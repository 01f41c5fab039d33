"""Sweep files: YAML in, validated and expanded into concrete trials before anything launches.

A trial is a fully resolved run config (seed included) identified by its canonical hash; a cell is one
point of the grid (all seeds and Optuna samples of it share the cell id).
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from analysis.checks import validate_checks
from icl_core.config import (
    MAX_SEED,
    MAX_TRIAL_GIB,
    RunConfig,
    config_hash,
    memory_estimate,
    memory_problem,
    read_yaml,
    set_dotted,
    validate_run_config,
)
from icl_core.errors import ConfigError, Strict, from_validation_error
from icl_core.families import build_family, canonical_specs

MAX_TRIALS = 10_000  # per sweep file, counted before anything is expanded (README, "Limits")


class SearchParam(Strict):
    """One Optuna-searched nuisance parameter: exactly one of the distributions."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int: tuple[int, int] | None = None
    choice: list[Any] | None = None

    @field_validator("loguniform", "uniform", "int", mode="before")
    @classmethod
    def _bounds_pair(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # YAML has lists, not tuples

    def kind(self) -> tuple[str, Any]:
        given = [(k, v) for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, choice")
        kind, value = given[0]
        if kind in ("loguniform", "uniform", "int") and not value[0] < value[1]:
            raise ValueError(f"{kind} bounds must be increasing, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        if kind == "choice" and not value:
            raise ValueError("choice needs at least one value")
        return kind, value


class TuneSpec(Strict):
    """Optuna search inside each grid cell for nuisance parameters (e.g. the learning rate)."""

    params: dict[str, SearchParam]
    trials_per_cell: int = Field(4, ge=1, le=MAX_TRIALS)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"

    @field_validator("params")
    @classmethod
    def _one_distribution_each(cls, v: dict[str, SearchParam]) -> dict[str, SearchParam]:
        if not v:
            raise ValueError("needs at least one parameter")
        for key, p in v.items():
            try:
                p.kind()
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return v


class Resources(Strict):
    """Per-trial resources; a fractional gpu packs several trials on one GPU. `bundle: K` trains up to K configs
    of one model shape as one bundled model (icl_core.bundle) in one Ray trial holding these resources."""

    cpu: float = Field(1.0, gt=0, le=4096, allow_inf_nan=False)
    gpu: float = Field(0.0, ge=0, le=1024, allow_inf_nan=False)
    bundle: int = Field(1, ge=1, le=1024)


class SweepSpec(Strict):
    name: str
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Any] = Field(default_factory=dict)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=lambda: [0], min_length=1,
                                                                   max_length=MAX_TRIALS)
    tune: TuneSpec | None = None
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(2, ge=0, le=100)  # Ray retries of a crashed trial, each from its last checkpoint
    checks: dict[str, Any] = Field(default_factory=dict)  # thresholds for `iclmix analyze check`

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError(f"must be letters, digits, '_', '-' or '.', got {v!r}")
        return v

    @field_validator("checks")
    @classmethod
    def _valid_checks(cls, v: dict[str, Any]) -> dict[str, Any]:
        validate_checks(v)  # a ConfigError names the field inside `checks`
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v


@dataclass(frozen=True)
class Cell:
    """One grid point: the dotted overrides it applies to the base config."""

    overrides: tuple[tuple[str, Any], ...]

    @cached_property
    def id(self) -> str:
        return config_hash({k: v for k, v in self.overrides})[:10]

    @cached_property
    def label(self) -> str:
        return ", ".join(f"{k}={value_label(v)}" for k, v in self.overrides) or "base"

    @cached_property
    def short_label(self) -> str:
        """What a person reads in MLflow: each family's weight, and the last part of every other key."""
        parts = []
        for key, value in self.overrides:
            mixture = _mixture(value)
            if mixture is not None:
                parts += [f"{fam.canonical_id}={w:g}" for fam, w in mixture.items()]
            else:
                parts.append(f"{key.rsplit('.', 1)[-1]}={value_label(value)}")
        return ", ".join(parts) or "base"


@dataclass(frozen=True)
class Trial:
    """A concrete run: its resolved config, hash, cell and seed (and Optuna's sample, if any)."""

    config: RunConfig
    cell: Cell
    seed: int
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return self.config.config_hash


def _mixture(v: Any) -> Any:
    """The mixture a grid value spells, or None (also for a bad one: reported when the config is validated)."""
    if isinstance(v, list) and v and isinstance(v[0], dict) and "family" in v[0]:
        from icl_core.families import build_mixture

        try:
            return build_mixture(v)
        except ConfigError:
            return None
    return None


def value_label(v: Any) -> str:
    """A grid value as labels name it: a mixture by its canonical id, anything else as text."""
    mixture = _mixture(v)
    return mixture.canonical_id if mixture is not None else str(v)


def simplex_points(n_components: int, steps: int) -> list[tuple[Fraction, ...]]:
    """All weight vectors with entries in {0, 1/steps, ..., 1} summing to 1 (a lattice on the simplex)."""

    def compositions(n: int, total: int) -> Iterator[tuple[int, ...]]:
        if n == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in compositions(n - 1, total - first):
                yield (first, *rest)

    return sorted((tuple(Fraction(c, steps) for c in combo) for combo in compositions(n_components, steps)),
                  reverse=True)


def simplex_size(n_components: int, steps: int) -> int:
    return math.comb(steps + n_components - 1, n_components - 1)


def expand_simplex(spec: Any, where: str) -> list[list[dict[str, Any]]]:
    """`{simplex: {components: [...], steps: n}}` -> mixture configs (zero-weight components dropped)."""
    body = spec.get("simplex")
    if not isinstance(body, dict) or set(body) - {"components", "steps"}:
        raise ConfigError(f"{where}.simplex", "needs exactly components: [family specs] and steps: N")
    comps, steps = body.get("components"), body.get("steps")
    if not isinstance(comps, list) or len(comps) < 2:
        raise ConfigError(f"{where}.simplex.components", "needs a list of at least two family specs")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{where}.simplex.steps", f"must be a positive integer, got {steps!r}")
    if simplex_size(len(comps), steps) > MAX_TRIALS:
        raise ConfigError(f"{where}.simplex.steps", f"{simplex_size(len(comps), steps)} mixtures, over the cap of "
                          f"{MAX_TRIALS} trials per sweep: fewer steps or components")
    specs = canonical_specs(comps, build_family, f"{where}.simplex.components")
    mixtures = []
    for weights in simplex_points(len(specs), steps):
        mixtures.append([{**s, "weight": float(w)} for s, w in zip(specs, weights) if w > 0])
    return mixtures


def axis_values(key: str, values: Any) -> list[Any]:
    where = f"grid.{key}"
    if isinstance(values, dict) and "simplex" in values:
        return expand_simplex(values, where)
    if not isinstance(values, list) or not values:
        raise ConfigError(where, "must be a non-empty list of values or {simplex: ...}")
    return values


def iter_cells(spec: SweepSpec) -> Iterator[Cell]:
    keys = list(spec.grid)
    axes = [axis_values(k, spec.grid[k]) for k in keys]
    total = math.prod(len(a) for a in axes) * len(spec.seeds) * (spec.tune.trials_per_cell if spec.tune else 1)
    if total > MAX_TRIALS:
        raise ConfigError("grid", f"{total} trials (cells x seeds x Optuna samples), over the cap of {MAX_TRIALS} "
                          "per sweep: split the sweep or coarsen the grid")
    for combo in itertools.product(*axes):
        yield Cell(tuple(zip(keys, combo)))


def resolve(base: dict[str, Any], overrides: dict[str, Any], where: str) -> RunConfig:
    data = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(data, key, copy.deepcopy(value))
    try:
        return validate_run_config(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e.field}" if where else e.field, e.message) from None


def expand(spec: SweepSpec) -> list[Trial]:
    """Every grid cell × seed as a concrete trial (Optuna samples are added round by round at run time)."""
    try:
        base_cfg = validate_run_config(spec.base)
    except ConfigError as e:
        raise ConfigError(f"base.{e.field}", e.message) from None
    if "seed" in spec.grid:
        raise ConfigError("grid.seed", "use the top-level seeds: list instead")
    trials, seen = [], {}
    for cell in iter_cells(spec):
        for seed in spec.seeds:
            cfg = resolve(spec.base, {**dict(cell.overrides), "seed": seed}, f"grid cell [{cell.label}]")
            if cfg.config_hash in seen:
                raise ConfigError("grid", f"cells [{seen[cfg.config_hash]}] and [{cell.label}] are the same run")
            seen[cfg.config_hash] = cell.label
            trials.append(Trial(cfg, cell, seed))
    if spec.tune:  # each searched key must exist in the config and accept the distribution's values
        for key, p in spec.tune.params.items():
            kind, value = p.kind()
            for v in value:
                resolve(spec.base, {key: v, "seed": spec.seeds[0]}, f"tune.params.{key}")
    del base_cfg
    return trials


def validate_sweep(data: Any, source: str = "sweep") -> SweepSpec:
    if not isinstance(data, dict):
        raise ConfigError(source, "a sweep file must be a YAML mapping with name, base, grid, seeds")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def load_sweep(path: str | Path) -> tuple[SweepSpec, list[Trial]]:
    """Read, validate and expand a sweep file; every error is a one-line ConfigError naming the field."""
    spec = validate_sweep(read_yaml(path), str(path))
    trials = expand(spec)
    check_names(spec, trials)
    check_bundle_memory(spec, trials)
    return spec, trials


def bundle_size(spec: SweepSpec, trials: list[Trial]) -> int:
    """The most configs one Ray trial trains at once."""
    return max(1, min(spec.resources.bundle, len(trials)))


def check_bundle_memory(spec: SweepSpec, trials: list[Trial]) -> None:
    """A bundle holds its members' memory at once: the per-trial limit applies to the whole bundle."""
    members = bundle_size(spec, trials)
    if members == 1:
        return
    largest = max(trials, key=lambda t: sum(memory_estimate(t.config).values()))
    problem = memory_problem(largest.config, MAX_TRIAL_GIB * 2**30, f"the {MAX_TRIAL_GIB:g} GiB limit per trial",
                             members)
    if problem:
        raise ConfigError(*problem)


def tune_metrics(trials: list[Trial]) -> list[str]:
    """The metrics a finished trial reports that `tune.metric` may name (as the trial logs them)."""
    tasks = {f.canonical_id for t in trials for f in t.config.eval_tasks()}
    return ["eval_loss", *(f"eval/{task}" for task in sorted(tasks)), "train/loss"]


def check_names(spec: SweepSpec, trials: list[Trial]) -> None:
    """Names in `checks` and `tune.metric` must be ones this sweep produces: a typo would only fail after it ran."""
    trials = list({t.cell.id: t for t in trials}.values())  # the seeds of a cell share its names
    tasks = {f.canonical_id for t in trials for f in t.config.eval_tasks()}
    mixtures = {t.config.data.family.canonical_id for t in trials}
    families = {c.canonical_id for t in trials for c in t.config.data.family.components}
    estimators = {e for t in trials for e in t.config.evaluation.estimators}

    def need(value: Any, have: set[str], field_name: str, what: str) -> None:
        if value is not None and value not in have:
            raise ConfigError(field_name, f"{value!r} is not {what} of this sweep (have: {', '.join(sorted(have))})")

    if spec.tune is not None:
        metrics = tune_metrics(trials)
        need(spec.tune.metric, set(metrics), "tune.metric", "a metric the trials report")
    check = validate_checks(spec.checks)
    if check is None:
        return
    for name in ("reference", "low", "high"):
        need(getattr(check, name, None), estimators, f"checks.{name}", "an evaluated estimator")
    if check.finding != "convex_combination" or check.mixture is not None:
        need(getattr(check, "mixture", None), mixtures, "checks.mixture", "a pretraining mixture")
    for name in ("family_a", "family_b"):
        need(getattr(check, name, None), families, f"checks.{name}", "a family in a pretraining mixture")
    for i, task in enumerate(getattr(check, "outside", None) or []):
        need(task, tasks, f"checks.outside[{i}]", "an eval task")


def trial_count(spec: SweepSpec, trials: list[Trial]) -> int:
    return len(trials) * (spec.tune.trials_per_cell if spec.tune else 1)


def flops_per_trial(cfg: RunConfig) -> float:
    """Model FLOPs of a whole training run (forward + backward, every step at the full prompt length)."""
    from icl_core.model import step_flops
    from icl_core.train import model_config

    return step_flops(model_config(cfg), cfg.data.n_points, cfg.train.batch_size) * cfg.train.steps


# Throughputs for the plan's estimates (model FLOP/s), as measured in docs/performance.md: a CPU core training
# the CPU twins' and the quickstart's models ("time to competence"), and an H200 at paper size ("GPU": one eager
# trial, four packed eager trials together, one trial with train.cuda_graph).
CPU_CORE_FLOPS = 30e9
GPU_FLOPS = {"eager": 21e12, "packed": 48e12, "cuda_graph": 52e12}


def plan_text(spec: SweepSpec, trials: list[Trial], cpus: int | None = None, gpus: int | None = None) -> str:
    """What `iclmix sweep plan` prints: cells, seeds, trial count, total compute and the estimated wall time on
    `cpus` cores and `gpus` GPUs (default: this machine's)."""
    cells: dict[str, Cell] = {}
    for t in trials:
        cells.setdefault(t.cell.id, t.cell)
    per_sample = 1 if spec.tune is None else spec.tune.trials_per_cell
    flops = [flops_per_trial(t.config) for t in trials for _ in range(per_sample)]
    total = sum(flops)
    lines = [f"sweep {spec.name}: {len(cells)} cells x {len(spec.seeds)} seeds"
             + (f" x {per_sample} Optuna samples" if spec.tune else "")
             + f" = {trial_count(spec, trials)} trials"]
    for cell_id, cell in cells.items():
        lines.append(f"  cell {cell_id}  {cell.label}")
    lines.append(f"seeds: {spec.seeds}")
    if spec.tune:
        lines.append(f"Optuna per cell: {', '.join(spec.tune.params)} ({spec.tune.metric}, {spec.tune.mode})")
    lines.append(f"resources per trial: cpu={spec.resources.cpu:g}, gpu={spec.resources.gpu:g}")
    lines.append(f"compute: {total:.3g} model FLOPs ({_human(total)})"
                 + f"; {_cpu_hours(total):.3g} CPU-core-hours at ~{CPU_CORE_FLOPS / 1e9:.0f} GFLOP/s per core")
    lines.append(_time_estimate(spec, trials, flops, cpus, gpus))
    return "\n".join(lines)


def _time_estimate(spec: SweepSpec, trials: list[Trial], flops: list[float], cpus: int | None,
                   gpus: int | None) -> str:
    """GPU-hours and wall time, from the measured throughputs above (an estimate: ±2x)."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    if gpu == 0:
        if cpus is None:
            from .runner import local_cpus

            cpus = local_cpus()
        at_once = max(1, int(cpus // cpu))
        wall = _packed_wall([f / (CPU_CORE_FLOPS * cpu) for f in flops], at_once)
        return f"estimated wall time on {cpus} CPU cores ({at_once} trial(s) at once): {duration_text(wall)}"
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    graph = trials[0].config.train.cuda_graph if trials else False
    rate = GPU_FLOPS["cuda_graph" if graph else "packed" if gpu <= 0.5 else "eager"]
    gpu_hours = sum(flops) / rate / 3600
    line = f"GPU-hours: {gpu_hours:.3g} at ~{rate / 1e12:.0f} model TFLOP/s per GPU (an H200 at paper size)"
    if gpus == 0:
        return line + "; no GPU here: `sweep plan --gpus N` estimates the wall time on N GPUs"
    at_once = max(1, int(gpus // gpu))
    wall = _packed_wall([f / (rate * min(gpu, 1.0)) for f in flops], at_once)
    return line + f"; estimated wall time on {gpus} GPU(s) ({at_once} trial(s) at once): {duration_text(wall)}"


def _packed_wall(seconds: list[float], slots: int) -> float:
    """Wall time of jobs of the given lengths on `slots` workers, longest first (each to the first free one)."""
    ends = [0.0] * slots
    for s in sorted(seconds, reverse=True):
        i = ends.index(min(ends))
        ends[i] += s
    return max(ends) if seconds else 0.0


def duration_text(seconds: float) -> str:
    """A duration as people read it: 45 s, 14 min, 2.5 h, 3.0 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _human(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def _cpu_hours(flops: float) -> float:
    return flops / CPU_CORE_FLOPS / 3600 if math.isfinite(flops) else float("nan")
