"""Coverage-vs-generalization maps, ICL curves and model-selection tables from a `load_sweep` frame.

The map's cell for (coverage value c, test value t) is the model's error on the eval tasks with test-axis
value t, of the trials whose coverage value is c, at k in-context examples (k = "all": the mean over
k >= 1). With a reference it is the model's *excess error* `model - reference` (0 = as good as the
reference; `mode="ratio"` gives `(model + eps) / (reference + eps)` instead, 1 = as good). References:
`bayes_task` (Bayes-optimal under the test prior), `best_baseline` (per k, the best of the classical
baselines zero/averaging/ols/ridge/lasso/knn), or any estimator name. Seeds (trials) are aggregated: the
mean over trials with a value and a 90 % Student-t interval over them (`seed_interval`; one trial has no
interval, shown as "n = 1"). Trials that failed contribute NaN and are counted as missing, never as zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from icl_core.errors import ConfigError
from icl_core.estimators import CLASSICAL

from .coverage import COVERAGE_AXES, TEST_AXES, coverage_sort_key

RATIO_EPS = 1e-3  # errors are normalized (zero predictor = 1); below 1e-3 a task counts as solved
LEVEL = 0.9  # the intervals' coverage: 90 %, as the eval's prompt bootstrap


# ---------------------------------------------------------------- options


def parse_k(value: Any) -> int | str:
    """`--k`: an integer or "all"."""
    if value is None or value == "all":
        return "all"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    try:
        return int(str(value))
    except ValueError:
        raise ConfigError("--k", f"must be an integer or 'all', got {value!r}") from None


def check_k(frame: pd.DataFrame, k: int | str) -> int | str:
    k = parse_k(k)
    ks = frame["k"].dropna()
    if ks.empty:
        raise ConfigError("--k", "the sweep has no evaluation rows")
    lo, hi = int(ks.min()), int(ks.max())
    if k == "all":
        if hi < 1:
            raise ConfigError("--k", "'all' averages k >= 1, but the sweep evaluates only k = 0")
        return k
    if not lo <= k <= hi:
        raise ConfigError("--k", f"k={k} is out of range: the sweep evaluates k = {lo}..{hi}")
    return k


def weight_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("weight:")]


ROW_LEVEL = ("task", "task_family", "nnz", "freq", "alpha", "in_support", "k", "estimator", "error", "ci_low",
             "ci_high", "n_prompts", "run_id", "run_name", "start_time")


def check_coverage(frame: pd.DataFrame, coverage: str) -> str:
    if coverage in frame.columns and coverage not in ROW_LEVEL:
        return coverage
    weights = weight_columns(frame)
    known = ", ".join([*weights, *COVERAGE_AXES, "or a trial column such as model.n_layer"])
    if coverage.startswith("weight:"):
        raise ConfigError("--coverage", f"no family {coverage[7:]!r} in any trial's mixture (known: {known})")
    raise ConfigError("--coverage", f"unknown coverage axis {coverage!r} (known: {known})")


def check_test_axis(frame: pd.DataFrame, axis: str) -> str:
    if axis not in TEST_AXES:
        raise ConfigError("--test-axis", f"unknown test axis {axis!r} (known: {', '.join(TEST_AXES)})")
    if axis != "task" and frame[axis].isna().all():
        tasks = ", ".join(pd.unique(frame["task"]))
        raise ConfigError("--test-axis", f"no eval task of this sweep has a {axis!r} (tasks: {tasks})")
    return axis


def check_reference(frame: pd.DataFrame, relative_to: str | None) -> str | None:
    if relative_to in (None, "", "none"):
        return None
    have = set(frame["estimator"].dropna())
    if relative_to == "best_baseline":
        if not have & set(CLASSICAL):
            raise ConfigError("--relative-to", f"the sweep evaluated no classical baseline ({', '.join(CLASSICAL)})")
        return relative_to
    if relative_to not in have:
        have_txt = ", ".join(sorted(have))
        raise ConfigError("--relative-to", f"estimator {relative_to!r} was not evaluated (have: {have_txt}, "
                          "best_baseline, none)")
    return relative_to


def apply_where(frame: pd.DataFrame, where: Mapping[str, Any] | None) -> pd.DataFrame:
    """Keep rows whose column equals the value (compared as text, so `model.n_layer=4` works)."""
    for key, value in (where or {}).items():
        if key not in frame.columns:
            raise ConfigError("--where", f"unknown column {key!r}")
        col = frame[key]
        mask = col.astype(str) == str(value)
        if not mask.any():
            try:
                mask = np.isclose(pd.to_numeric(col, errors="coerce"), float(value))
            except (TypeError, ValueError):
                pass
        if not np.any(mask):
            have = ", ".join(map(str, pd.unique(col)[:12]))
            raise ConfigError("--where", f"no trial has {key}={value} (values: {have})")
        frame = frame[mask]
    return frame


def default_axes(frame: pd.DataFrame) -> tuple[str, str]:
    """A sensible (coverage, test axis) for a sweep."""
    trials = frame.drop_duplicates("run_id")
    mixtures = pd.unique(trials["mixture"])
    fams = mixture_families(frame)
    if len(mixtures) > 1:
        if two_family_sweep(frame):  # a two-family simplex: the weight of one of them
            coverage = f"weight:{sorted(fams)[-1]}"
        elif (trials["nnz_set"] != "{}").all() and trials["nnz_set"].nunique() > 1:
            coverage = "nnz_set"
        elif (trials["freq_band"] != "none").all() and trials["freq_band"].nunique() > 1:
            coverage = "freq_band"
        else:
            coverage = "mixture"
    elif trials["cell_label"].nunique() > 1:
        coverage = "cell_label"
    else:
        coverage = "mixture"
    rows = frame.drop_duplicates("task")
    for axis in ("nnz", "freq", "alpha"):
        if rows[axis].notna().all():
            return coverage, axis
    return coverage, "task"


def default_reference(frame: pd.DataFrame) -> str | None:
    have = set(frame["estimator"].dropna())
    if "bayes_task" in have:
        return "bayes_task"
    return "best_baseline" if have & set(CLASSICAL) else None


# ---------------------------------------------------------------- per-trial values


def _order(values: list[Any], axis: str) -> list[Any]:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if axis in ("nnz_set", "freq_band"):
        return sorted(vals, key=lambda v: coverage_sort_key(axis, v))
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in vals):
        return sorted(vals)
    return list(dict.fromkeys(vals))  # first appearance (cell / eval-config order)


def _estimator_table(frame: pd.DataFrame, k: int | str) -> pd.DataFrame:
    """Wide table indexed by (run_id, task, k) with one column per estimator, restricted to k."""
    rows = frame[frame["k"] >= 1] if k == "all" else frame[frame["k"] == k]
    return rows.set_index(["run_id", "task", "k", "estimator"])["error"].unstack("estimator")


def trial_values(
    frame: pd.DataFrame,
    *,
    k: int | str = "all",
    relative_to: str | None = None,
    mode: str = "excess",
    estimator: str = "model",
) -> pd.DataFrame:
    """One value per (trial, task): the estimator's error (or excess/ratio over the reference) at k."""
    if mode not in ("excess", "ratio"):
        raise ConfigError("--mode", f"must be 'excess' or 'ratio', got {mode!r}")
    wide = _estimator_table(frame, k)
    if estimator not in wide.columns:
        raise ConfigError("--estimator", f"estimator {estimator!r} was not evaluated")
    model = wide[estimator]
    if relative_to is None:
        ref = None
    elif relative_to == "best_baseline":
        cols = [c for c in CLASSICAL if c in wide.columns]
        ref = wide[cols].min(axis=1, skipna=True)
        ref[wide[cols].isna().all(axis=1)] = np.nan
    else:
        ref = wide[relative_to]
    per_k = pd.DataFrame({"model": model, "ref": ref if ref is not None else np.nan})
    means = per_k.groupby(level=["run_id", "task"], observed=True).mean()
    counts = per_k.groupby(level=["run_id", "task"], observed=True).count()
    nk = per_k.groupby(level=["run_id", "task"], observed=True).size()
    # a (trial, task) with any missing k is missing as a whole (never a partial average)
    means.loc[counts["model"] < nk, "model"] = np.nan
    if ref is not None:
        means.loc[counts["ref"] < nk, "ref"] = np.nan
        if mode == "excess":
            value = means["model"] - means["ref"]
        else:
            value = (means["model"] + RATIO_EPS) / (means["ref"] + RATIO_EPS)
    else:
        value = means["model"]
    return value.rename("value").reset_index()


# ---------------------------------------------------------------- the map


@dataclass
class CoverageMap:
    """Matrices indexed by coverage value (rows) x test-axis value (columns)."""

    mean: pd.DataFrame
    ci_low: pd.DataFrame
    ci_high: pd.DataFrame
    support: pd.DataFrame  # True where every trial of the cell had the test task in its pretraining support
    n: pd.DataFrame  # trials with a value
    n_trials: pd.DataFrame  # trials in the cell, failed/unfinished included
    coverage: str
    test_axis: str
    k: int | str
    relative_to: str | None
    mode: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_long(self) -> pd.DataFrame:
        """One row per cell: coverage, test value, mean, ci_low, ci_high, n, n_trials, in_support."""
        out = []
        for r in self.mean.index:
            for c in self.mean.columns:
                out.append({self.coverage: r, self.test_axis: c, "mean": self.mean.loc[r, c],
                            "ci_low": self.ci_low.loc[r, c], "ci_high": self.ci_high.loc[r, c],
                            "n": int(self.n.loc[r, c]), "n_trials": int(self.n_trials.loc[r, c]),
                            "in_support": bool(self.support.loc[r, c])})
        return pd.DataFrame(out)


def seed_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean over trials (seeds): valid for the 2–5 seeds a sweep has, where a
    bootstrap over seeds is too narrow. One value has no interval: (nan, nan), shown as "n = 1"."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats

    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def select_best(frame: pd.DataFrame) -> pd.DataFrame:
    """Where a (cell, seed) has several trials (Optuna samples), keep the FINISHED one with the lowest eval_loss."""
    trials = frame.drop_duplicates("run_id")
    if not trials.duplicated(["cell", "seed"]).any():
        return frame
    ranked = trials.assign(_ok=trials["status"] != "FINISHED", _loss=trials["eval_loss"].fillna(np.inf))
    keep = ranked.sort_values(["_ok", "_loss"]).drop_duplicates(["cell", "seed"])["run_id"]
    return frame[frame["run_id"].isin(set(keep))]


def coverage_map(
    frame: pd.DataFrame,
    coverage: str | None = None,
    test_axis: str | None = None,
    k: int | str = "all",
    relative_to: str | None = "bayes_task",
    *,
    mode: str = "excess",
    estimator: str = "model",
    where: Mapping[str, Any] | None = None,
    level: float = LEVEL,
) -> CoverageMap:
    """The coverage-vs-generalization matrix (see the module docstring for what a cell holds)."""
    frame = apply_where(frame, where)
    dflt_cov, dflt_test = default_axes(frame)
    coverage = check_coverage(frame, coverage or dflt_cov)
    test_axis = check_test_axis(frame, test_axis or dflt_test)
    k = check_k(frame, k)
    relative_to = check_reference(frame, relative_to)
    frame = select_best(frame)
    rows = frame[frame[test_axis].notna()] if test_axis != "task" else frame

    values = trial_values(rows, k=k, relative_to=relative_to, mode=mode, estimator=estimator)
    info = rows.drop_duplicates(["run_id", "task"])[["run_id", "task", coverage, test_axis, "in_support"]]
    if test_axis == "task":
        info = info.loc[:, ~info.columns.duplicated()]
    cells = info.merge(values, on=["run_id", "task"], how="left")

    row_vals = _order(list(pd.unique(frame.drop_duplicates("run_id")[coverage])), coverage)
    col_vals = _order(list(pd.unique(rows[test_axis])), test_axis)
    shape = (len(row_vals), len(col_vals))
    mean, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    n, n_trials, support = np.zeros(shape, int), np.zeros(shape, int), np.zeros(shape, bool)
    ri = {v: i for i, v in enumerate(row_vals)}
    ci = {v: j for j, v in enumerate(col_vals)}
    for (cv, tv), grp in cells.groupby([coverage, test_axis], sort=False, observed=True):
        i, j = ri[cv], ci[tv]
        # one value per trial (several tasks may share a test value: average them within the trial)
        per_trial = grp.groupby("run_id", observed=True)["value"].agg(lambda s: s.mean() if s.notna().all() else np.nan)
        vals = per_trial.dropna().to_numpy()
        n_trials[i, j] = len(per_trial)
        n[i, j] = len(vals)
        support[i, j] = bool(grp["in_support"].all())
        if len(vals):
            mean[i, j] = vals.mean()
            low[i, j], high[i, j] = seed_interval(vals, level)

    def df(a):
        return pd.DataFrame(a, index=pd.Index(row_vals, name=coverage), columns=pd.Index(col_vals, name=test_axis))

    return CoverageMap(df(mean), df(low), df(high), df(support), df(n), df(n_trials), coverage, test_axis, k,
                       relative_to, mode, meta={"sweep": frame.attrs.get("sweep", ""), "where": dict(where or {})})


# ---------------------------------------------------------------- ICL curves


def coverage_values(frame: pd.DataFrame, coverage: str) -> list[Any]:
    coverage = check_coverage(frame, coverage)
    return _order(list(pd.unique(frame.drop_duplicates("run_id")[coverage])), coverage)


def select_value(frame: pd.DataFrame, coverage: str, value: Any) -> pd.DataFrame:
    """The rows of trials whose coverage column equals `value` (as text, or numerically)."""
    coverage = check_coverage(frame, coverage)
    col = frame[coverage]
    mask = (col.astype(str) == str(value)).to_numpy()
    if not mask.any():
        try:
            mask = np.isclose(pd.to_numeric(col, errors="coerce").to_numpy(dtype=float), float(value))
        except (TypeError, ValueError):
            pass
    if not mask.any():
        have = ", ".join(map(str, coverage_values(frame, coverage)))
        raise ConfigError("--value", f"no trial has {coverage} = {value} (values: {have})")
    return frame[mask]


def icl_curves(
    frame: pd.DataFrame,
    *,
    coverage: str | None = None,
    value: Any = None,
    where: Mapping[str, Any] | None = None,
    estimators: list[str] | None = None,
    level: float = LEVEL,
) -> pd.DataFrame:
    """Error vs k for every estimator and eval task: columns task, estimator, k, mean, ci_low, ci_high, n.

    Restricted to trials whose `coverage` column equals `value` when both are given. The band is the
    eval's own 90 % prompt-bootstrap band averaged over trials; for an estimator that differs between
    trials (the model, over seeds) it is widened to cover the Student-t interval over trials as well.
    """
    frame = apply_where(frame, where)
    if coverage is not None and value is not None:
        frame = select_value(frame, coverage, value)
    frame = select_best(frame)
    if estimators:
        frame = frame[frame["estimator"].isin(estimators)]
    out = []
    for (task, est, kk), grp in frame.groupby(["task", "estimator", "k"], sort=False, observed=True):
        vals = grp["error"].to_numpy(dtype=float)
        ok = ~np.isnan(vals)
        if not ok.any():
            out.append((task, est, kk, np.nan, np.nan, np.nan, 0, len(vals)))
            continue
        v = vals[ok]
        lo = float(np.nanmean(grp["ci_low"].to_numpy(float)[ok]))
        hi = float(np.nanmean(grp["ci_high"].to_numpy(float)[ok]))
        if len(v) > 1 and np.ptp(v) > 0:
            blo, bhi = seed_interval(v, level)
            lo, hi = min(lo, blo), max(hi, bhi)
        out.append((task, est, kk, float(v.mean()), lo, hi, int(ok.sum()), len(vals)))
    return pd.DataFrame(out, columns=["task", "estimator", "k", "mean", "ci_low", "ci_high", "n", "n_trials"])


# ---------------------------------------------------------------- model selection (two-family mixtures)


def mixture_families(frame: pd.DataFrame) -> list[str]:
    """Families with positive weight in some trial's mixture."""
    trials = frame.drop_duplicates("run_id")
    return [c[7:] for c in weight_columns(frame) if (trials[c] > 0).any()]


def two_family_sweep(frame: pd.DataFrame) -> list[str] | None:
    """The two families of a sweep over mixtures of exactly two families (some trial mixing both), or None."""
    fams = mixture_families(frame)
    if len(fams) != 2:
        return None
    trials = frame.drop_duplicates("run_id")
    mixed = ((trials[[f"weight:{f}" for f in fams]] > 0).sum(axis=1) == 2).any()
    return fams if mixed else None


def model_selection(frame: pd.DataFrame, k: int | str = "all", *, level: float = LEVEL) -> pd.DataFrame:
    """For a sweep over mixtures of two families A and B (finding 1).

    Rows: family (the eval task = that family), weight (of that family in pretraining), series
    (`model`, `bayes_pretrain`, `bayes_task`, `specialist`), mean, ci_low, ci_high, n. `specialist` is the
    model error of the trials whose weight on the family is 1 (the same value at every weight).
    """
    fams = two_family_sweep(frame)
    if fams is None:
        have = mixture_families(frame)
        raise ConfigError("--coverage", "model selection needs a sweep over mixtures of two families (some trial "
                          f"mixing both); this one has {len(have)}: {', '.join(have)}")
    k = check_k(frame, k)
    frame = select_best(frame)
    out = []
    for fam in fams:
        rows = frame[frame["task"] == fam]
        if rows.empty:
            continue
        have = set(rows["estimator"].dropna())
        wcol = f"weight:{fam}"
        for series in ("model", "bayes_pretrain", "bayes_task"):
            if series not in have:
                continue
            vals = trial_values(rows, k=k, estimator=series).merge(
                rows.drop_duplicates("run_id")[["run_id", wcol]], on="run_id")
            for w, grp in vals.groupby(wcol, observed=True):
                v = grp["value"].dropna().to_numpy()
                lo, hi = seed_interval(v, level)
                out.append((fam, float(w), series, v.mean() if len(v) else np.nan, lo, hi, len(v), len(grp)))
                if series == "model" and w == 1.0:
                    out.append((fam, float(w), "specialist", v.mean() if len(v) else np.nan, lo, hi, len(v),
                                len(grp)))
    return pd.DataFrame(out, columns=["family", "weight", "series", "mean", "ci_low", "ci_high", "n", "n_trials"])
