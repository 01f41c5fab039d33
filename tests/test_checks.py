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
from conftest import ROOT

from analysis.checks import run_check
from analysis.load import read_frame
from iclmix.cli import main
from sweeps.findings import validate_checks
from sweeps.spec import load_sweep

FIXTURES = ROOT / "tests" / "fixtures"
VERDICTS = {  # as reported in docs/reproduction.md
    "linear_sine_cpu": "PASS",
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


def test_check_needs_a_checks_section(capsys):
    rc = main(["analyze", "check", "--sweep", "linear_sine_cpu", "--file", str(ROOT / "sweeps" / "quickstart.yaml"),
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
