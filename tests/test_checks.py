"""`iclmix analyze check` on committed real results.

tests/fixtures/*.csv.gz are the tidy frames of the CPU-scale sweeps reported in docs/reproduction.md, written by
docs/reproduce.sh (`iclmix analyze export`). Each is checked against the thresholds of its shipped sweep file
and must give the verdict the docs report; each check is also shown to turn when the results cross its
threshold, and its numbers are recomputed here straight from the frame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT

from analysis.checks import run_check, validate_checks
from analysis.load import read_frame
from iclmix.cli import main
from sweeps.spec import load_sweep

FIXTURES = ROOT / "tests" / "fixtures"
VERDICTS = {  # as reported in docs/reproduction.md (the quickstart: in the README, the end of `make demo`)
    "linear_sine_cpu": "PASS",
    "mixture_weights_cpu": "FAIL",  # d = 5 models part-way learned: not within 0.02 of Bayes (docs/reproduction.md)
    "sine_frequency_cpu": "PASS",
    "sparsity_coverage_cpu": "FAIL",  # at nnz = 2 the model is above both lasso and ols
    "quickstart": "PASS",
}


def frame(name: str) -> pd.DataFrame:
    return read_frame(FIXTURES / f"{name}.csv.gz", name)


def check_of(name: str):
    return validate_checks(load_sweep(ROOT / "sweeps" / f"{name}.yaml")[0].checks)


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_cli_check_on_committed_results(name, capsys):
    rc = main(["analyze", "check", "--sweep", name, "--file", str(ROOT / "sweeps" / f"{name}.yaml"),
               "--frame", str(FIXTURES / f"{name}.csv.gz")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"{name}: {check_of(name).finding}: ")
    assert out[-1] == VERDICTS[name] and rc == (0 if VERDICTS[name] == "PASS" else 1)
    assert len(out) >= 3  # the numbers behind the verdict


def test_check_with_the_perfect_learner_in_the_models_place_says_whether_a_check_can_pass(capsys):
    """`--as bayes_pretrain`: finding 1's check is one a perfect learner passes; finding 2's, at the twin's d, it
    fails at nnz = 2, on the least-squares edge of the window (docs/reproduction.md)."""
    def check(name: str, estimator: str) -> tuple[int, list[str], str]:
        rc = main(["analyze", "check", "--sweep", name, "--file", str(ROOT / "sweeps" / f"{name}.yaml"),
                   "--frame", str(FIXTURES / f"{name}.csv.gz"), "--as", estimator])
        captured = capsys.readouterr()
        return rc, captured.out.strip().splitlines(), captured.err

    rc, out, _ = check("mixture_weights_cpu", "bayes_pretrain")
    assert rc == 0 and out[0] == "(bayes_pretrain judged in the model's place)" and out[-1] == "PASS"
    rc, out, _ = check("sparsity_coverage_cpu", "bayes_pretrain")
    assert rc == 1 and out[-1] == "FAIL"
    assert "nnz = 2: model 0.4764" in out[2] and "position (model - lasso) / (ols - lasso) = 1.06, outside" in out[2]
    rc, out, _ = check("mixture_weights_cpu", "ols")  # least squares knows nothing of sparsity: not the specialist
    assert rc == 1 and out[-1] == "FAIL"
    for name, estimator in (("quickstart", "bayes"), ("sine_frequency_cpu", "bayes_pretrain")):
        rc, out, err = check(name, estimator)  # unknown here, and not evaluated in that sweep
        assert rc == 2 and err.startswith("iclmix: error: --as: ") and not out


def test_check_needs_a_checks_section(capsys, tmp_path):
    no_checks = tmp_path / "no_checks.yaml"
    data = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    no_checks.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "checks"}))
    rc = main(["analyze", "check", "--sweep", "linear_sine_cpu", "--file", str(no_checks),
               "--frame", str(FIXTURES / "linear_sine_cpu.csv.gz")])
    assert rc == 2 and "checks" in capsys.readouterr().err


def test_convex_combination_numbers_and_thresholds():
    f, c = frame("linear_sine_cpu"), check_of("linear_sine_cpu")
    rows = f[(f["task_family"] == "convex") & (f["k"] >= 1)]
    wide = rows.pivot_table(index=["alpha", "run_id", "k"], columns="estimator", values="error")
    excess = (wide["model"] - wide["bayes_task"]).groupby("alpha").mean()
    res = run_check(f, c)
    assert np.allclose(res.table.set_index("alpha")["excess"], excess, atol=1e-9)
    assert res.passed == (excess[[0.0, 1.0]].max() <= c.edge_max_excess
                          and excess.idxmax() not in (0.0, 1.0)
                          and excess.max() >= c.peak_ratio * excess[[0.0, 1.0]].max())
    # A model as far off at the pure families as in the middle: no longer the finding.
    bad = f.copy()
    edge = (bad["task_family"] == "convex") & bad["alpha"].isin([0.0, 1.0]) & (bad["estimator"] == "model")
    bad.loc[edge, "error"] += 0.25
    assert not run_check(bad, c).passed
    # The thresholds are the sweep file's: a stricter peak ratio fails the same results.
    assert not run_check(f, c.model_copy(update={"peak_ratio": 100.0})).passed


def test_model_selection_numbers_and_thresholds():
    f, c = frame("mixture_weights_cpu"), check_of("mixture_weights_cpu")
    res = run_check(f, c)
    t = res.table
    for fam, w in ((c.family_a, c.weight), (c.family_b, 1 - c.weight)):
        rows = f[(f["task"] == fam) & (f["estimator"] == "model")]
        mixed = rows[np.isclose(rows[f"weight:{fam}"], w)].groupby("k")["error"].mean()
        special = rows[np.isclose(rows[f"weight:{fam}"], 1.0)].groupby("k")["error"].mean()
        got = t[t["family"] == fam].set_index("k")
        assert np.allclose(got["model"], mixed.loc[got.index])
        assert np.allclose(got["specialist"], special.loc[got.index])
    expected = bool(t["ok"].all())
    assert res.passed == expected
    # A mixture model that matches the better of its specialist and bayes_pretrain at every k passes;
    # one 50 % worse than its specialist everywhere fails.
    good, bad = f.copy(), f.copy()
    for fam, w in ((c.family_a, c.weight), (c.family_b, 1 - c.weight)):
        at = (f["task"] == fam) & np.isclose(f[f"weight:{fam}"], w)
        special = f[(f["task"] == fam) & np.isclose(f[f"weight:{fam}"], 1.0) & (f["estimator"] == "model")]
        best = np.minimum(special.groupby("k")["error"].mean(),
                          f[at & (f["estimator"] == "bayes_pretrain")].groupby("k")["error"].mean())
        m = at & (f["estimator"] == "model")
        good.loc[m, "error"] = f.loc[m, "k"].map(best).to_numpy()
        bad.loc[m, "error"] = f.loc[m, "k"].map(special.groupby("k")["error"].mean() * 1.5 + 0.05).to_numpy()
    assert run_check(good, c).passed
    assert not run_check(bad, c).passed


def test_interpolation_numbers_and_thresholds():
    f, c = frame("sparsity_coverage_cpu"), check_of("sparsity_coverage_cpu")
    res = run_check(f, c)
    rows = f[(f["mixture"] == c.mixture) & f["k"].between(1, int(f["dim"].iloc[0]) - 1)]
    for _, r in res.table.iterrows():
        sub = rows[np.isclose(rows["nnz"], r["nnz"])]
        level = {e: sub[sub["estimator"] == e]["error"].mean() for e in ("model", c.low, c.high)}
        assert np.isclose(r["model"], level["model"]) and np.isclose(r[c.low], level[c.low])
        assert np.isclose(r["position"], (level["model"] - level[c.low]) / (level[c.high] - level[c.low]))
    assert res.passed == bool(res.table["ok"].all())
    # A model halfway between lasso and least squares at every k passes; one at least squares + 0.1 fails.
    for shift, verdict in ((None, True), (0.1, False)):
        g = f.copy()
        at = (g["mixture"] == c.mixture) & (g["task_family"] == "sparse_linear")
        for task, grp in g[at].groupby("task"):
            per_k = grp.pivot_table(index="k", columns="estimator", values="error")
            target = per_k[c.high] + shift if shift is not None else (per_k[c.low] + per_k[c.high]) / 2
            m = at & (g["task"] == task) & (g["estimator"] == "model")
            g.loc[m, "error"] = g.loc[m, "k"].map(target).to_numpy()
        assert run_check(g, c).passed is verdict


def test_frequency_extremes_numbers_and_thresholds():
    f, c = frame("sine_frequency_cpu"), check_of("sine_frequency_cpu")
    res = run_check(f, c)
    rows = f[(f["mixture"] == c.mixture) & (f["estimator"] == "model") & (f["k"] >= 1) & f["freq"].notna()]
    err = rows.groupby("freq")["error"].mean()
    inside = rows.groupby("freq")["in_support"].all()
    assert np.allclose(res.table.set_index("freq")["model"], err)
    ratio = err / err[inside].mean()
    lo, hi = err.index.min(), err.index.max()
    assert res.passed == bool(min(ratio[lo], ratio[hi]) >= c.min_ratio)
    # A model as good outside its band as inside: the finding is gone.
    flat = f.copy()
    m = (flat["mixture"] == c.mixture) & (flat["estimator"] == "model") & ~flat["in_support"]
    flat.loc[m, "error"] = err[inside].mean()
    assert not run_check(flat, c).passed


def test_coverage_numbers_and_thresholds():
    f, c = frame("quickstart"), check_of("quickstart")
    res = run_check(f, c)
    rows = f[f["k"] >= 1].pivot_table(index=["mixture", "task", "in_support", "k"], columns="estimator",
                                      values="error")
    excess = (rows["model"] - rows[c.reference]).groupby(["mixture", "task", "in_support"]).mean().reset_index()
    checked = excess[excess["in_support"] | excess["task"].isin(c.outside)]
    got = res.table.set_index(["mixture", "task"])["excess"]
    assert len(got) == len(checked) == 4 + 3  # 4 in-support cells (0.5: both, 0 and 1: one each), 3 sine cells
    assert np.allclose(got.loc[list(zip(checked["mixture"], checked["task"], strict=True))], checked[0])
    inside, outside = checked[checked["in_support"]][0], checked[~checked["in_support"]][0]
    assert res.passed == bool(inside.max() <= c.max_excess and outside.min() >= c.outside_min_excess)
    # Models 0.1 further from Bayes inside their support have not learned enough: FAIL.
    worse = f.copy()
    m = worse["in_support"] & (worse["estimator"] == "model") & (worse["k"] >= 1)
    worse.loc[m, "error"] += 0.1
    assert not run_check(worse, c).passed
    # A sine the models fit as well as its Bayes predictor would not be outside their coverage: FAIL.
    fit = f.copy()
    sine = fit["task"].isin(c.outside)
    best = fit[sine & (fit["estimator"] == c.reference)].set_index(["run_id", "task", "k"])["error"]
    m = sine & (fit["estimator"] == "model")
    fit.loc[m, "error"] = best.loc[list(zip(fit.loc[m, "run_id"], fit.loc[m, "task"], fit.loc[m, "k"],
                                            strict=True))].to_numpy()
    assert not run_check(fit, c).passed
