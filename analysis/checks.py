"""The findings a sweep exists to show, each finding's schema next to the check that measures it.

A sweep file's `checks:` section picks one finding (`finding:`) with its thresholds; it is validated with the rest
of the file, before anything launches, and measured on the finished sweep by `iclmix analyze check` (PASS/FAIL with
the numbers). Errors are the normalized squared errors of the eval (zero predictor = 1); "mean over k" is over the
k named by each check. Model errors are averaged over seeds (trials of a cell), per k, from a `load_sweep` frame;
estimators that do not depend on the trial (baselines, Bayes) are averaged the same way.

pandas is imported where a check runs, not here: validating a sweep file must not wait for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator

from icl_core.errors import ConfigError, Strict, from_validation_error

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class CheckResult:
    """The verdict, one line per number behind it, and the table those numbers come from."""

    finding: str
    claim: str
    passed: bool
    lines: list[str]
    table: pd.DataFrame

    def text(self, sweep: str = "") -> str:
        head = f"{sweep}: {self.finding}" if sweep else self.finding
        return "\n".join([f"{head}: {self.claim}", *(f"  {line}" for line in self.lines),
                          "PASS" if self.passed else "FAIL"])


def _finished(frame: pd.DataFrame) -> pd.DataFrame:
    from .maps import select_best

    return select_best(frame[frame["error"].notna()])


def _mixtures(frame: pd.DataFrame) -> list[str]:
    import pandas as pd

    return [str(m) for m in pd.unique(frame.drop_duplicates("run_id")["mixture"].astype(str))]


def _mixture_rows(frame: pd.DataFrame, mixture: str | None) -> pd.DataFrame:
    have = _mixtures(frame)
    if mixture is None:
        if len(have) != 1:
            raise ConfigError("checks.mixture", f"required: the sweep has {len(have)} mixtures ({', '.join(have)})")
        mixture = have[0]
    rows = frame[frame["mixture"].astype(str) == mixture]
    if rows.empty:
        raise ConfigError("checks.mixture", f"no finished trial pretrained on {mixture} (have: {', '.join(have)})")
    return rows


def _curve(rows: pd.DataFrame, estimator: str) -> pd.Series:
    """Mean error per k (over trials) of one estimator; index k."""
    sel = rows[rows["estimator"] == estimator]
    return sel.groupby("k", observed=True)["error"].mean()


def _level(rows: pd.DataFrame, estimator: str, ks: tuple[int, int] | None = None) -> float:
    """Mean error over k (k >= 1, or the inclusive range `ks`) and trials."""
    c = _curve(rows, estimator)
    c = c[c.index >= 1] if ks is None else c[(c.index >= ks[0]) & (c.index <= ks[1])]
    return float(c.mean()) if len(c) else math.nan


def _need(rows: pd.DataFrame, estimator: str, field_name: str) -> None:
    if not (rows["estimator"] == estimator).any():
        raise ConfigError(field_name, f"estimator {estimator!r} was not evaluated in this sweep")


def _n_seeds(rows: pd.DataFrame) -> int:
    return int(rows["run_id"].nunique())


class _Check(Strict):
    @field_validator("k", "position", mode="before", check_fields=False)
    @classmethod
    def _pair(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # YAML has lists, not tuples

# ---------------------------------------------------------------- finding 1: model selection


class ModelSelection(_Check):
    """Finding 1: at mixture weight `weight` (of family_a; family_b has the rest) the model is, at every k,
    within max(rel_tol x specialist, abs_tol) of each family's specialist (the model pretrained on that
    family alone) and within max(bayes_rel_tol x bayes_pretrain, abs_tol) of its own mixture's Bayes predictor."""

    finding: Literal["model_selection"]
    family_a: str
    family_b: str
    weight: float = Field(0.5, gt=0, lt=1)
    rel_tol: float = Field(0.15, ge=0)
    abs_tol: float = Field(0.02, ge=0)
    bayes_rel_tol: float = Field(0.20, ge=0)


def check_model_selection(frame: pd.DataFrame, c: ModelSelection) -> CheckResult:
    import pandas as pd

    frame = _finished(frame)
    lines, table, ok = [], [], True
    for fam, w in ((c.family_a, c.weight), (c.family_b, 1 - c.weight)):
        wcol = f"weight:{fam}"
        if wcol not in frame.columns:
            raise ConfigError("checks.family_a" if fam == c.family_a else "checks.family_b",
                              f"{fam} is in no pretraining mixture of this sweep")
        rows = frame[frame["task"].astype(str) == fam]
        if rows.empty:
            raise ConfigError("checks", f"the sweep has no eval task {fam}")
        mixed = rows[np.isclose(rows[wcol], w)]
        special = rows[np.isclose(rows[wcol], 1.0)]
        if mixed.empty or special.empty:
            missing = f"weight {w:g}" if mixed.empty else "weight 1 (the specialist)"
            raise ConfigError("checks.weight", f"no finished trial with {fam} at {missing}")
        _need(mixed, "bayes_pretrain", "checks")
        df = pd.DataFrame({"model": _curve(mixed, "model"), "specialist": _curve(special, "model"),
                           "bayes_pretrain": _curve(mixed, "bayes_pretrain")}).dropna()
        df["limit_specialist"] = df["specialist"] + np.maximum(c.rel_tol * df["specialist"], c.abs_tol)
        df["limit_bayes"] = df["bayes_pretrain"] + np.maximum(c.bayes_rel_tol * df["bayes_pretrain"], c.abs_tol)
        df["ok"] = (df["model"] <= df["limit_specialist"]) & (df["model"] <= df["limit_bayes"])
        worst = (df["model"] - df[["limit_specialist", "limit_bayes"]].min(axis=1)).idxmax()
        r = df.loc[worst]
        fam_ok = bool(df["ok"].all())
        ok &= fam_ok
        bad = [int(k) for k in df.index[~df["ok"]]]
        lines.append(
            f"{fam} (weight {w:g}, {_n_seeds(mixed)} seeds; specialist {_n_seeds(special)} seeds): "
            f"{'ok at every k' if fam_ok else f'over the limit at k = {bad}'}; worst k = {int(worst)}: "
            f"model {r['model']:.4f}, specialist {r['specialist']:.4f} (limit {r['limit_specialist']:.4f}), "
            f"bayes_pretrain {r['bayes_pretrain']:.4f} (limit {r['limit_bayes']:.4f})")
        table.append(df.reset_index().assign(family=fam, weight=w))
    claim = (f"at weight {c.weight:g} the model is within max({c.rel_tol:.0%}, {c.abs_tol:g}) of each family's "
             f"specialist and within max({c.bayes_rel_tol:.0%}, {c.abs_tol:g}) of bayes_pretrain at every k")
    return CheckResult("model_selection", claim, ok, lines, pd.concat(table, ignore_index=True))

# ---------------------------------------------------------------- finding 2: interpolation


class Interpolation(_Check):
    """Finding 2: pretrained on `mixture`, on sparse tasks of intermediate nnz the model's error (mean over k in
    `k`, default 1 … d−1) lies between the `low` and `high` estimators' errors: its position
    (model − low) / (high − low) is inside `position`."""

    finding: Literal["interpolation"]
    mixture: str
    test_nnz: list[int] = Field(min_length=1)
    low: str = "lasso"
    high: str = "ols"
    k: tuple[int, int] | None = None
    position: tuple[float, float] = (0.0, 1.0)

    @field_validator("k")
    @classmethod
    def _k_range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError("must be an increasing range of k >= 0")
        return v

    @field_validator("position")
    @classmethod
    def _position_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError("must be an increasing range")
        return v


def check_interpolation(frame: pd.DataFrame, c: Interpolation) -> CheckResult:
    import pandas as pd

    rows = _mixture_rows(_finished(frame), c.mixture)
    _need(rows, c.low, "checks.low")
    _need(rows, c.high, "checks.high")
    dim = int(rows["dim"].dropna().iloc[0])
    ks = c.k or (1, dim - 1)
    lines, table, ok = [], [], True
    for nnz in c.test_nnz:
        sub = rows[(rows["task_family"].astype(str).isin(["sparse_linear", "linear"])) & np.isclose(rows["nnz"], nnz)]
        if sub.empty:
            raise ConfigError("checks.test_nnz", f"the sweep has no eval task with nnz = {nnz}")
        m, lo, hi = (_level(sub, e, ks) for e in ("model", c.low, c.high))
        pos = (m - lo) / (hi - lo) if hi != lo else math.nan
        inside = c.position[0] <= pos <= c.position[1]
        ok &= bool(inside)
        lines.append(f"nnz = {nnz}: model {m:.4f} between {c.low} {lo:.4f} and {c.high} {hi:.4f}? position "
                     f"(model - {c.low}) / ({c.high} - {c.low}) = {pos:.2f}, "
                     f"{'inside' if inside else 'outside'} [{c.position[0]:g}, {c.position[1]:g}]")
        table.append({"nnz": nnz, "model": m, c.low: lo, c.high: hi, "position": pos, "ok": inside})
    claim = (f"pretrained on {c.mixture} ({_n_seeds(rows)} seeds), at intermediate nnz the model's error "
             f"(mean over k = {ks[0]}…{ks[1]}) lies between {c.low}'s and {c.high}'s")
    return CheckResult("interpolation", claim, ok, lines, pd.DataFrame(table))

# ---------------------------------------------------------------- finding 3: convex combinations


class ConvexCombination(_Check):
    """Finding 3: on convex combinations α·a + (1−α)·b the model's excess error over `reference` (mean over
    k ≥ 1) is at most `edge_max_excess` at `edge_alphas` and peaks at an intermediate α, at least
    `peak_ratio` times the largest edge excess."""

    finding: Literal["convex_combination"]
    mixture: str | None = None  # default: the sweep's only pretraining mixture
    reference: str = "bayes_task"
    edge_alphas: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=1)
    edge_max_excess: float = Field(0.1, ge=0)
    peak_ratio: float = Field(2.0, gt=0)


def check_convex_combination(frame: pd.DataFrame, c: ConvexCombination) -> CheckResult:
    import pandas as pd

    rows = _mixture_rows(_finished(frame), c.mixture)
    rows = rows[rows["task_family"].astype(str) == "convex"]
    if rows.empty:
        raise ConfigError("checks", "the sweep has no convex-combination eval tasks")
    _need(rows, c.reference, "checks.reference")
    alphas = sorted(float(a) for a in pd.unique(rows["alpha"].dropna()))
    excess = {}
    for a in alphas:
        sub = rows[np.isclose(rows["alpha"], a)]
        excess[a] = _level(sub, "model") - _level(sub, c.reference)
    edges = [a for a in alphas if any(math.isclose(a, e) for e in c.edge_alphas)]
    inner = [a for a in alphas if a not in edges]
    if not edges or not inner:
        raise ConfigError("checks.edge_alphas", f"need edge and intermediate alphas among the tasks' {alphas}")
    edge_max = max(excess[a] for a in edges)
    peak = max(inner, key=lambda a: excess[a])
    edges_ok = edge_max <= c.edge_max_excess
    peak_ok = excess[peak] >= max(excess[a] for a in alphas) and excess[peak] >= c.peak_ratio * max(edge_max, 1e-9)
    lines = ["excess over " + c.reference + " by alpha: " + ", ".join(f"{a:g}: {excess[a]:.4f}" for a in alphas),
             f"edges {', '.join(f'{a:g}' for a in edges)}: largest excess {edge_max:.4f} "
             f"{'<=' if edges_ok else '>'} {c.edge_max_excess:g}",
             f"peak at alpha = {peak:g}: {excess[peak]:.4f} = {excess[peak] / max(edge_max, 1e-9):.1f} x the largest "
             f"edge excess ({'>=' if peak_ok else 'below'} {c.peak_ratio:g} x, and "
             f"{'the' if peak_ok else 'not the'} overall maximum)"]
    table = pd.DataFrame({"alpha": alphas, "excess": [excess[a] for a in alphas],
                          "edge": [a in edges for a in alphas]})
    claim = (f"pretrained on {str(rows['mixture'].iloc[0])} ({_n_seeds(rows)} seeds), the model's excess over "
             f"{c.reference} (mean over k >= 1) is small at alpha in {c.edge_alphas} and peaks in between")
    return CheckResult("convex_combination", claim, bool(edges_ok and peak_ok), lines, table)

# ---------------------------------------------------------------- finding 4: frequency extremes


class FrequencyExtremes(_Check):
    """Finding 4: pretrained on `mixture`, the model's error (mean over k ≥ 1) on sine tasks at the `extremes`
    frequencies (default: the lowest and highest test frequency outside the band) is at least `min_ratio`
    times its mean error on the test frequencies inside the band."""

    finding: Literal["frequency_extremes"]
    mixture: str
    extremes: list[float] | None = None
    min_ratio: float = Field(3.0, gt=0)


def check_frequency_extremes(frame: pd.DataFrame, c: FrequencyExtremes) -> CheckResult:
    import pandas as pd

    rows = _mixture_rows(_finished(frame), c.mixture)
    rows = rows[rows["freq"].notna()]
    if rows.empty:
        raise ConfigError("checks", "the sweep has no single-frequency sine eval tasks")
    freqs = sorted(float(f) for f in pd.unique(rows["freq"]))
    err = {f: _level(rows[np.isclose(rows["freq"], f)], "model") for f in freqs}
    inside = {f: bool(rows[np.isclose(rows["freq"], f)]["in_support"].all()) for f in freqs}
    band = [f for f in freqs if inside[f]]
    if not band:
        raise ConfigError("checks.mixture", "no test frequency lies inside its pretraining band")
    lo, hi = min(band), max(band)
    if c.extremes is not None:
        missing = [f for f in c.extremes if not any(math.isclose(f, g) for g in freqs)]
        if missing:
            raise ConfigError("checks.extremes", f"no eval task at frequency {missing} (have {freqs})")
        extremes = [g for g in freqs if any(math.isclose(f, g) for f in c.extremes)]
    else:
        extremes = [f for f in (min(freqs), max(freqs)) if not inside[f]]
    if not extremes:
        raise ConfigError("checks.extremes", "no test frequency outside the pretraining band")
    inband = float(np.mean([err[f] for f in band]))
    ratios = {f: err[f] / inband for f in extremes}
    ok = all(r >= c.min_ratio for r in ratios.values())
    lines = ["model error by test frequency: " + ", ".join(
                 f"{f:g}{'*' if inside[f] else ''}: {err[f]:.4f}" for f in freqs) + "   (* = inside the band)",
             f"inside the band ({lo:g}…{hi:g}): mean {inband:.4f}",
             *(f"frequency {f:g}: {err[f]:.4f} = {ratios[f]:.1f} x the in-band error "
               f"({'>=' if ratios[f] >= c.min_ratio else 'below'} {c.min_ratio:g} x)" for f in extremes)]
    table = pd.DataFrame({"freq": freqs, "model": [err[f] for f in freqs], "in_band": [inside[f] for f in freqs]})
    claim = (f"pretrained on {c.mixture} ({_n_seeds(rows)} seeds), the model's error (mean over k >= 1) at the "
             f"extreme frequencies is at least {c.min_ratio:g} x its error inside the band")
    return CheckResult("frequency_extremes", claim, ok, lines, table)

# ---------------------------------------------------------------- the coverage map (the quickstart)


class Coverage(_Check):
    """The coverage map shows models that learned: for every pretraining mixture, the model's excess error over
    `reference` (mean over k >= 1 and seeds) is at most `max_excess` on each eval task inside the mixture's
    support, and at least `outside_min_excess` on each task in `outside` (tasks outside every mixture)."""

    finding: Literal["coverage"]
    reference: str = "bayes_task"
    max_excess: float = Field(0.1, ge=0)
    outside: list[str] = Field(min_length=1)
    outside_min_excess: float = Field(0.2, ge=0)


def check_coverage(frame: pd.DataFrame, c: Coverage) -> CheckResult:
    import pandas as pd

    rows = _finished(frame)
    _need(rows, c.reference, "checks.reference")
    tasks = [str(t) for t in pd.unique(rows["task"].astype(str))]
    missing = [t for t in c.outside if t not in tasks]
    if missing:
        raise ConfigError("checks.outside", f"no eval task {missing[0]} in this sweep (have: {', '.join(tasks)})")
    table = []
    for (mixture, task), sub in rows.groupby([rows["mixture"].astype(str), rows["task"].astype(str)], sort=False):
        inside = bool(sub["in_support"].all())
        if task in c.outside and inside:
            raise ConfigError("checks.outside", f"{task} is inside the support of {mixture}")
        if not inside and task not in c.outside:
            continue  # out of support but not a held-out task (e.g. sparse prompts for a dense-only model)
        excess = _level(sub, "model") - _level(sub, c.reference)
        if math.isnan(excess):
            raise ConfigError("checks.reference",
                              f"no model or {c.reference} errors for {task} pretrained on {mixture}")
        ok = excess <= c.max_excess if inside else excess >= c.outside_min_excess
        table.append({"mixture": mixture, "task": task, "in_support": inside, "excess": excess,
                      "seeds": _n_seeds(sub), "ok": bool(ok)})
    t = pd.DataFrame(table)
    lines = []
    for inside, limit, sign in ((True, c.max_excess, "<="), (False, c.outside_min_excess, ">=")):
        part = t[t["in_support"] == inside]
        where = "inside the support" if inside else "outside every mixture"
        if part.empty:
            raise ConfigError("checks", f"no finished trial has an eval task {where}")
        worst = part.loc[part["excess"].idxmax() if inside else part["excess"].idxmin()]
        bad = part[~part["ok"]]
        lines.append(f"{where}: {len(part)} cells, excess {part['excess'].min():.4f} … {part['excess'].max():.4f}; "
                     f"worst {worst['task']} pretrained on {worst['mixture']}: {worst['excess']:.4f} "
                     f"({'all' if bad.empty else f'{len(bad)} not'} {sign} {limit:g})")
    claim = (f"the model's excess over {c.reference} (mean over k >= 1) is <= {c.max_excess:g} on every task "
             f"inside its pretraining support and >= {c.outside_min_excess:g} on {', '.join(c.outside)}")
    return CheckResult("coverage", claim, bool(t["ok"].all()), lines, t)


FINDINGS: dict[str, type[_Check]] = {
    "model_selection": ModelSelection,
    "interpolation": Interpolation,
    "convex_combination": ConvexCombination,
    "frequency_extremes": FrequencyExtremes,
    "coverage": Coverage,
}
Check = ModelSelection | Interpolation | ConvexCombination | FrequencyExtremes | Coverage


def validate_checks(data: Any) -> Check | None:
    """The validated check of a `checks:` mapping (None when empty)."""
    if not data:
        return None
    if not isinstance(data, dict):
        raise ConfigError("", "must be a mapping with a `finding:` key")
    finding = data.get("finding")
    if finding not in FINDINGS:
        raise ConfigError("finding", f"must be one of {', '.join(FINDINGS)} (got {finding!r})")
    try:
        return FINDINGS[finding].model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


CHECKS = {
    ModelSelection: check_model_selection,
    Interpolation: check_interpolation,
    ConvexCombination: check_convex_combination,
    FrequencyExtremes: check_frequency_extremes,
    Coverage: check_coverage,
}


def run_check(frame: pd.DataFrame, check: Check) -> CheckResult:
    """Evaluate the sweep file's check on a `load_sweep` frame."""
    if not frame["error"].notna().any():
        raise ConfigError("--sweep", "no finished trial with evaluation results yet")
    return CHECKS[type(check)](frame, check)


def as_model(frame: pd.DataFrame, estimator: str) -> pd.DataFrame:
    """The frame with `estimator`'s rows judged in the model's place: what a check says of a learner that became
    that estimator (bayes_pretrain: each trial's perfect learner, so a check it fails cannot be passed)."""
    import pandas as pd

    rows = frame[frame["estimator"].astype(str) == estimator]
    if rows.empty:
        raise ConfigError("--as", f"estimator {estimator!r} was not evaluated in this sweep")
    model = rows.assign(estimator="model")
    return pd.concat([frame[frame["estimator"].astype(str) != "model"], model], ignore_index=True)

