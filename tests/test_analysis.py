"""Analysis from MLflow: a synthetic sweep store with known eval tables, written the way sweeps/trial.py writes
real trials (tags, flattened params, config.yaml and eval.csv artifacts), read back into maps, figures and a
report. No training: every number in the store is a formula, so the expected matrices are exact."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from analysis.coverage import coverage_descriptors, family_from_id, in_support, parse_family_id, task_axes
from analysis.load import load_sweep, sweep_file
from analysis.maps import coverage_map, icl_curves, model_selection, seed_interval
from icl_core.config import ConfigError, dump_yaml, task_family, validate_run_config
from icl_core.evaluate import EvalRow, summarize, write_eval_csv
from icl_core.families import Sine, build_mixture
from iclmix.cli import main
from sweeps import layout
from sweeps import tracking as tr

ROOT = Path(__file__).resolve().parents[1]
SPARSE1, SPARSE2, LINEAR = "sparse_linear(nnz=1)", "sparse_linear(nnz=2)", "linear"
TASKS = [{"family": "sparse_linear", "nnz": 1}, {"family": "sparse_linear", "nnz": 2}, {"family": "linear"}]
ESTIMATORS = ["model", "zero", "ols", "lasso", "bayes_pretrain", "bayes_task"]
WEIGHTS = [0.0, 0.25, 0.5, 1.0]  # weight of sparse_linear(nnz=1); the rest is dense linear
SEEDS = [0, 1]
N_POINTS = 4  # k = 0..3
# (weight, seed) -> status; everything else FINISHED
STATUS = {(0.25, 0): "FAILED", (0.25, 1): "FAILED", (0.5, 1): "FAILED", (1.0, 1): "RUNNING"}
SWEEP_TEXT = "name: synth\n# a synthetic sweep for the analysis tests\nseeds: [0, 1]\nchecks: {finding: none}\n"


def err(est: str, ti: int, k: int, w: float, seed: int) -> float:
    """The known eval table: error of estimator `est` on task index `ti` after k examples."""
    base = (0.5 + 0.3 * ti) / (1 + k)
    return {
        "model": base + 0.1 * w + 0.02 * seed + 0.01 * ti * k,
        "bayes_task": 0.5 * base,
        "bayes_pretrain": 0.6 * base,
        "zero": 1.0,
        "ols": max(0.0, 1 - k / 5),
        "lasso": 0.8 / (1 + k),
    }[est]


def _mixture(w: float) -> list[dict]:
    parts = [{"family": "sparse_linear", "nnz": 1, "weight": w}, {"family": "linear", "weight": 1 - w}]
    return [p for p in parts if p["weight"] > 0]  # the sweep's simplex drops zero weights


def make_store(root: Path, name: str, cells: list[tuple[str, list[dict]]], seeds: list[int], tasks: list[dict],
               estimators: list[str], dim: int, n_points: int, error_fn, status: dict, sweep_text: str,
               proxied: bool = False) -> str:
    """A sweep written as sweeps/runner.py + sweeps/trial.py write one, into the store at `root` (shared by the
    sweeps of this module: creating an sqlite store costs seconds); returns the tracking URI.

    `proxied`: runs get `mlflow-artifacts:/` URIs as behind `mlflow server --artifacts-destination ROOT/artifacts`,
    with the files placed where that server would have put them (no server runs here).
    """
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    location = f"mlflow-artifacts:/{name}" if proxied else str(root / "artifacts" / name)
    exp_id = client.create_experiment(name, artifact_location=location)

    def put(run_id: str, src: Path, sub: str = "") -> None:
        if not proxied:
            client.log_artifact(run_id, str(src), sub or None)
            return
        dest = root / "artifacts" / name / run_id / "artifacts" / sub
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / src.name)

    parent = tr.ensure_run(client, exp_id, sweep=name, role="parent", name=name, tags={layout.TAG_COMMIT: "abc123"})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"{name}.yaml").write_text(sweep_text)
        put(parent, Path(d) / f"{name}.yaml", "sweep")
    for ci, (label, mixture) in enumerate(cells):
        for seed in seeds:
            cfg = validate_run_config({
                "seed": seed,
                "data": {"dim": dim, "n_points": n_points, "mixture": mixture},
                "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
                "train": {"steps": 10},
                "eval": {"n_prompts": 64, "tasks": tasks, "estimators": estimators},
            })
            key = cfg.config_hash
            run_id = tr.ensure_run(
                client, exp_id, sweep=name, role="trial", name=f"cell{ci}-s{seed}-{key[:6]}", parent_id=parent,
                match={"config_hash": key},
                tags={layout.TAG_CELL: f"cell{ci}", layout.TAG_CELL_LABEL: label, layout.TAG_SEED: str(seed),
                      layout.TAG_HASH: key, layout.TAG_COMMIT: "abc123", layout.TAG_SEARCH: "{}"},
            )
            tr.log_params(client, run_id, tr.flatten_config(cfg.to_dict()))
            st = status.get((ci, seed), "FINISHED")
            if st == "NO_CONFIG":  # killed before its first log
                tr.end_run(client, run_id, "KILLED")
                continue
            with tempfile.TemporaryDirectory() as d:  # logged when the trial starts, as sweeps/trial.py does
                (Path(d) / "config.yaml").write_text(dump_yaml(cfg))
                put(run_id, Path(d) / "config.yaml")
            if st == "FAILED":
                why = f"RuntimeError: synthetic failure of cell{ci} seed {seed}"
                tr.set_tags(client, run_id, {layout.TAG_ERROR: why})
                tr.end_run(client, run_id, "FAILED")
                continue
            if st == "RUNNING":
                continue
            rows = [EvalRow(task_family(t).canonical_id, k, e, v, v - 0.01, v + 0.01, 64)
                    for ti, t in enumerate(tasks) for e in estimators for k in range(n_points)
                    for v in [error_fn(e, ti, k, ci, seed)]]
            with tempfile.TemporaryDirectory() as d:
                write_eval_csv(rows, Path(d) / "eval.csv")
                tr.log_metrics(client, run_id, [Metric(k, v, 0, 10) for k, v in summarize(rows).items()])
                put(run_id, Path(d) / "eval.csv")
            tr.end_run(client, run_id, "FINISHED")
    return uri


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def synth(store_root) -> tuple[str, Path]:
    root = store_root
    cells = [(f"data.mixture={w}", _mixture(w)) for w in WEIGHTS]
    status = {(WEIGHTS.index(w), s): st for (w, s), st in STATUS.items()}
    uri = make_store(root, "synth", cells, SEEDS, TASKS, ESTIMATORS, 5, N_POINTS,
                     lambda e, ti, k, ci, s: err(e, ti, k, WEIGHTS[ci], s), status, SWEEP_TEXT)
    return uri, root


@pytest.fixture(scope="module")
def frame(synth) -> pd.DataFrame:
    return load_sweep("synth", synth[0])


def _finished(w: float, seed: int) -> bool:
    return STATUS.get((w, seed), "FINISHED") == "FINISHED"


# ---------------------------------------------------------------- ids, coverage, support


def test_family_ids_round_trip_and_support():
    specs = [{"family": "sparse_linear", "nnz": 3}, {"family": "sine", "freq_lo": 1e-05, "freq_hi": 2.5},
             {"family": "convex", "a": {"family": "linear"}, "b": {"family": "sine"}, "alpha": 0.3},
             [{"family": "linear", "weight": 0.25}, {"family": "relu_net", "hidden": 8, "weight": 0.75}]]
    for spec in specs:
        cid = task_family(spec).canonical_id
        assert family_from_id(cid).canonical_id == cid
    assert parse_family_id("mixture(0.5*linear+0.5*sparse_linear(nnz=1))") == [
        {"family": "linear", "weight": 0.5}, {"family": "sparse_linear", "nnz": 1, "weight": 0.5}]

    mix = build_mixture([{"family": "sine", "freq_lo": 1.0, "freq_hi": 2.0, "weight": 0.5},
                         {"family": "sine", "freq_lo": 1.5, "freq_hi": 3.0, "weight": 0.5}])
    d = coverage_descriptors(mix, 1)
    assert d["freq_band"] == "[1, 3]" and d["freq_width"] == 2.0 and d["nnz_set"] == "{}"
    assert in_support(Sine(2.5, 2.5), mix, 1) and in_support(Sine(1.2, 2.8), mix, 1)
    assert not in_support(Sine(0.5, 0.5), mix, 1) and not in_support(Sine(3.5, 3.5), mix, 1)
    assert task_axes(Sine(4.0, 4.0), 1)["freq"] == 4.0 and math.isnan(task_axes(Sine(1.0, 2.0), 1)["freq"])

    sparse = build_mixture([{"family": "sparse_linear", "nnz": 1, "weight": 0.5}, {"family": "linear", "weight": 0.5}])
    assert coverage_descriptors(sparse, 5)["nnz_set"] == "{1,5}"
    assert in_support(task_family({"family": "sparse_linear", "nnz": 5}), sparse, 5)  # nnz = d is dense linear
    assert not in_support(task_family({"family": "sparse_linear", "nnz": 2}), sparse, 5)
    convex = {"family": "convex", "a": {"family": "linear"}, "b": {"family": "sparse_linear", "nnz": 1}}
    assert in_support(task_family({**convex, "alpha": 1.0}), sparse, 5)
    assert not in_support(task_family({**convex, "alpha": 0.5}), sparse, 5)


# ---------------------------------------------------------------- loading


def test_load_sweep_is_tidy_and_keeps_failed_trials(frame, synth):
    n_trials = len(WEIGHTS) * len(SEEDS)
    assert frame["run_id"].nunique() == n_trials
    assert len(frame) == n_trials * len(TASKS) * N_POINTS * len(ESTIMATORS)
    assert not frame.duplicated(["run_id", "task", "k", "estimator"]).any()
    trials = frame.drop_duplicates("run_id").set_index(["weight:" + SPARSE1, "seed"])
    for w in WEIGHTS:
        for s in SEEDS:
            t = trials.loc[(w, s)]
            assert t["status"] == STATUS.get((w, s), "FINISHED")
            assert t["weight:linear"] == pytest.approx(1 - w)
            assert t["model.n_layer"] == 2 and t["model_size"] == "2x2x32"
            rows = frame[frame["run_id"] == t["run_id"]]
            if _finished(w, s):
                assert rows["error"].notna().all()
                got = rows.set_index(["task", "k", "estimator"])["error"]
                assert got[(SPARSE2, 3, "model")] == pytest.approx(err("model", 1, 3, w, s), abs=1e-15)
            else:  # failed / unfinished: every row present, errors NaN (never 0)
                assert rows["error"].isna().all() and not t["has_eval"]
    failed = trials.loc[(0.5, 1)]
    assert "synthetic failure" in failed["failure"]
    support = frame.drop_duplicates(["run_id", "task"]).set_index(["weight:" + SPARSE1, "task"])["in_support"]
    assert support.loc[(0.0, LINEAR)].all() and not support.loc[(0.0, SPARSE1)].any()
    assert support.loc[(1.0, SPARSE1)].all() and not support.loc[(1.0, LINEAR)].any()
    assert not support.xs(SPARSE2, level="task").any()
    assert frame.attrs["parent_run_id"] and frame.attrs["sweep"] == "synth"
    assert sweep_file("synth", synth[0]) == ("synth.yaml", SWEEP_TEXT)


def test_download_path_and_cache(frame, synth, tmp_path):
    """Remote-style loading (download with a thread pool into the cache) gives the same frame."""
    cache = tmp_path / "cache"
    got = load_sweep("synth", synth[0], cache_dir=cache, local_direct=False, workers=4)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), frame.reset_index(drop=True))
    cached = {p: p.stat().st_mtime_ns for p in cache.glob("*/eval.csv")}
    assert len(cached) == sum(_finished(w, s) for w in WEIGHTS for s in SEEDS)
    again = load_sweep("synth", synth[0], cache_dir=cache, local_direct=False)  # served from the cache
    assert again["error"].equals(frame["error"])
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/eval.csv")} == cached


def test_failed_trial_is_read_back_from_its_config_and_one_without_is_left_out_with_a_warning(store_root):
    """A failed trial's rows come from its config.yaml (its tasks, estimators and defaults, validated as
    `iclmix train` would); a run that died before logging it cannot be placed, and the warning says so."""
    cells = [("a", _mixture(0.5)), ("b", _mixture(1.0))]
    uri = make_store(store_root, "noconf", cells, [0], [{"family": "linear"}], ["model", "ols"], 3, 3,
                     lambda e, ti, k, ci, s: 0.5, {(0, 0): "FAILED", (1, 0): "NO_CONFIG"}, "name: noconf\n")
    with pytest.warns(UserWarning, match=r"1 trial run\(s\) of 'noconf' logged no config.yaml and are left out"):
        got = load_sweep("noconf", uri)
    assert set(got["cell_label"]) == {"a"} and got["status"].eq("FAILED").all() and got["error"].isna().all()
    assert sorted(got["estimator"].unique()) == ["model", "ols"] and sorted(got["k"].unique()) == [0, 1, 2]
    assert got["n_prompts"].eq(64).all() and got["task"].eq(LINEAR).all() and got["dim"].eq(3).all()


# ---------------------------------------------------------------- the map


def _expected_value(w, s, ti, ref):
    ks = range(1, N_POINTS)
    if ref == "bayes_task":
        return float(np.mean([err("model", ti, k, w, s) - err("bayes_task", ti, k, w, s) for k in ks]))
    return float(np.mean([err("model", ti, k, w, s) for k in ks]))


@pytest.mark.parametrize("ref", ["bayes_task", None])
def test_coverage_map_exact(frame, ref):
    m = coverage_map(frame, "weight:" + SPARSE1, "nnz", k="all", relative_to=ref)
    assert list(m.mean.index) == WEIGHTS and list(m.mean.columns) == [1.0, 2.0, 5.0]
    for w in WEIGHTS:
        for ti, nnz in enumerate([1.0, 2.0, 5.0]):
            vals = [_expected_value(w, s, ti, ref) for s in SEEDS if _finished(w, s)]
            assert m.n_trials.loc[w, nnz] == 2 and m.n.loc[w, nnz] == len(vals)
            if not vals:
                assert math.isnan(m.mean.loc[w, nnz]) and math.isnan(m.ci_low.loc[w, nnz])
                continue
            assert m.mean.loc[w, nnz] == pytest.approx(np.mean(vals), abs=1e-12)
            # two seeds: the 90 % Student-t interval, mean -/+ t(0.95, 1) sd / sqrt(2); one seed: no interval
            if len(vals) == 1:
                assert math.isnan(m.ci_low.loc[w, nnz]) and math.isnan(m.ci_high.loc[w, nnz])
                continue
            half = 6.313752 * np.std(vals, ddof=1) / math.sqrt(2)
            assert m.ci_low.loc[w, nnz] == pytest.approx(np.mean(vals) - half, abs=1e-6)
            assert m.ci_high.loc[w, nnz] == pytest.approx(np.mean(vals) + half, abs=1e-6)
    expected_support = pd.DataFrame([[False, False, True], [True, False, True], [True, False, True],
                                     [True, False, False]], index=m.support.index, columns=m.support.columns)
    pd.testing.assert_frame_equal(m.support, expected_support)
    long = m.to_long()
    assert len(long) == 12 and long["mean"].isna().sum() == 3  # the all-failed row: missing, not zero


def test_coverage_map_best_baseline_at_k_and_other_axes(frame):
    m = coverage_map(frame, "weight:" + SPARSE1, "task", k=2, relative_to="best_baseline")
    assert list(m.mean.columns) == [SPARSE1, SPARSE2, LINEAR]
    best = min(err(e, 2, 2, 0.0, 0) for e in ("zero", "ols", "lasso"))
    want = np.mean([err("model", 2, 2, 0.0, s) - best for s in SEEDS])
    assert m.mean.loc[0.0, LINEAR] == pytest.approx(want, abs=1e-12)
    r = coverage_map(frame, "nnz_set", "nnz", k=1, relative_to="bayes_task", mode="ratio")
    assert list(r.mean.index) == ["{1}", "{5}", "{1,5}"]
    ratio = (err("model", 0, 1, 1.0, 0) + 1e-3) / (err("bayes_task", 0, 1, 1.0, 0) + 1e-3)
    assert r.mean.loc["{1}", 1.0] == pytest.approx(ratio, abs=1e-12)
    mix = coverage_map(frame, "mixture", "nnz", relative_to=None)
    assert len(mix.mean) == len(WEIGHTS)


def test_bad_options_are_config_errors(frame):
    with pytest.raises(ConfigError, match="--coverage"):
        coverage_map(frame, "weight:sine", "nnz")
    with pytest.raises(ConfigError, match="--test-axis"):
        coverage_map(frame, "nnz_set", "freq")
    with pytest.raises(ConfigError, match="--k"):
        coverage_map(frame, "nnz_set", "nnz", k=N_POINTS)
    with pytest.raises(ConfigError, match="--relative-to"):
        coverage_map(frame, "nnz_set", "nnz", relative_to="knn")


def test_curves_and_model_selection(frame):
    c = icl_curves(frame, coverage="weight:" + SPARSE1, value="0.5")
    row = c[(c["task"] == LINEAR) & (c["estimator"] == "model") & (c["k"] == 2)].iloc[0]
    assert row["mean"] == pytest.approx(err("model", 2, 2, 0.5, 0)) and row["n"] == 1 and row["n_trials"] == 2
    assert row["ci_low"] == pytest.approx(row["mean"] - 0.01) and row["ci_high"] == pytest.approx(row["mean"] + 0.01)
    failed = icl_curves(frame, coverage="weight:" + SPARSE1, value=0.25)
    assert failed["mean"].isna().all() and (failed["n"] == 0).all()

    ms = model_selection(frame).set_index(["family", "series", "weight"])
    spec = ms.loc[(SPARSE1, "specialist", 1.0)]
    assert spec["mean"] == pytest.approx(_expected_value(1.0, 0, 0, None)) and spec["n"] == 1
    lin_spec = ms.loc[(LINEAR, "specialist", 1.0)]  # weight 1 on linear = weight 0 on sparse
    assert lin_spec["mean"] == pytest.approx(np.mean([_expected_value(0.0, s, 2, None) for s in SEEDS]))
    assert math.isnan(ms.loc[(SPARSE1, "model", 0.25)]["mean"])  # failed trials: missing, not zero
    # Student-t over seeds: mean 7/3, sd 1.528, t(0.95, 2) = 2.920 -> 7/3 -/+ 2.576; one seed has no interval.
    lo, hi = seed_interval(np.array([1.0, 2.0, 4.0]))
    assert lo == pytest.approx(7 / 3 - 2.5758, abs=1e-3) and hi == pytest.approx(7 / 3 + 2.5758, abs=1e-3)
    assert all(math.isnan(v) for v in seed_interval(np.array([0.5])))
    # wider than a percentile bootstrap over the same seeds, which cannot leave [min, max] = [1, 4]
    assert lo < 1.0 and hi > 4.0


# ---------------------------------------------------------------- figures and the CLI


def _png_colours(path: Path) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    flat = (img[..., :3].reshape(-1, 3) * 255).round().astype(np.uint8)
    return len(np.unique(flat, axis=0))


def test_cli_heatmap_and_curves(synth, tmp_path, capsys):
    uri, _ = synth
    out = tmp_path / "heat"
    assert main(["analyze", "heatmap", "--sweep", "synth", "--tracking-uri", uri, "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].with_suffix(".svg").stat().st_size > 1000
    assert _png_colours(pngs[0]) > 50
    table = pd.read_csv(pngs[0].with_suffix(".csv"))
    assert table["mean"].isna().sum() == 3
    assert "weight_sparse_linear" in pngs[0].name and "vs_bayes_task" in pngs[0].name
    assert "logged" in capsys.readouterr().out

    out2 = tmp_path / "curves"  # (one figure per coverage value is the report's job, tested below)
    assert main(["analyze", "curves", "--sweep", "synth", "--tracking-uri", uri, "--out", str(out2), "--no-log",
                 "--coverage", "nnz_set", "--value", "{1,5}"]) == 0
    pngs = list(out2.glob("*.png"))
    assert len(pngs) == 1 and _png_colours(pngs[0]) > 50
    curves = pd.read_csv(next(out2.glob("*.csv")))
    assert curves["n_trials"].max() == 4 and set(curves["task"]) == {SPARSE1, SPARSE2, LINEAR}


@pytest.mark.parametrize("argv, option", [
    (["--sweep", "nope"], "--sweep"),
    (["--sweep", "synth", "--coverage", "weight:relu_net(hidden=100)"], "--coverage"),
    (["--sweep", "synth", "--test-axis", "depth"], "--test-axis"),
    (["--sweep", "synth", "--k", "99"], "--k"),
    (["--sweep", "synth", "--k", "two"], "--k"),
    (["--sweep", "synth", "--where", "model.n_layer=7"], "--where"),
])
def test_cli_bad_input_exit_2(synth, tmp_path, capsys, argv, option):
    code = main(["analyze", "heatmap", "--tracking-uri", synth[0], "--out", str(tmp_path), "--no-log", *argv])
    err_text = capsys.readouterr().err.strip()
    assert code == 2 and len(err_text.splitlines()) == 1 and option in err_text, err_text


def test_cli_default_tracking_uri(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "report", "--sweep", "ghost", "--out", "o"]) == 2
    assert "--tracking-uri" in capsys.readouterr().err


def _chromium() -> str | None:
    exe = shutil.which("chromium")
    if exe:
        return exe
    if not shutil.which("apt-get"):
        pytest.skip("chromium is missing and apt-get is unavailable to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
    got = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, text=True,
                         timeout=900)
    if got.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"could not install chromium with apt-get: {got.stderr.strip()[-300:]}")
    return shutil.which("chromium")


def test_report_self_contained_and_renders(synth, tmp_path, capsys):
    uri, _ = synth
    out = tmp_path / "report"
    assert main(["analyze", "report", "--sweep", "synth", "--tracking-uri", uri, "--out", str(out)]) == 0
    page = out / "report.html"
    text = page.read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    local = [r for r in refs if not r.startswith(("data:", "http:", "https:", "#"))]
    assert local and all((out / r).is_file() for r in local), local
    assert text.count("data:image/png;base64,") >= 2 + 1 + len(WEIGHTS)  # 2 maps, model selection, curves
    assert "synthetic failure of cell1 seed 0" in text and "RUNNING" in text and "checks: {finding: none}" in text
    assert "missing" in text and "<table>" in text
    # a cell with one finished seed of two shows its value and n, not an interval of zero width
    assert re.search(r"<td[^>]*>-?[0-9.e+-]+ \(n = 1 of 2\)</td>", text), text[:2000]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("synth")
    parent = client.search_runs([exp.experiment_id], "tags.`iclmix.role` = 'parent'")[0]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "analysis/report")}
    assert "report.html" in logged and any(n.startswith("heatmap_") and n.endswith(".png") for n in logged)

    exe = _chromium()
    shot = tmp_path / "shot.png"
    profile = tmp_path / "chrome-profile"
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert _png_colours(shot) > 200  # a rendered page with figures, not a blank one


def test_sine_sweep_freq_axes_on_a_proxied_store(store_root, tmp_path, capsys):
    """Also: a store whose runs have mlflow-artifacts:/ URIs (written through a proxying server, read after it
    stopped) is read from, and logged to, DB_DIR/artifacts directly."""
    tasks = [{"family": "sine", "freq_lo": f, "freq_hi": f} for f in (0.25, 1.5, 4.0)]
    cells = [("narrow", [{"family": "sine", "freq_lo": 1.0, "freq_hi": 2.0}]),
             ("wide", [{"family": "sine", "freq_lo": 0.5, "freq_hi": 3.0}])]
    uri = make_store(store_root, "sines", cells, [0], tasks, ["model", "zero", "knn", "bayes_task"], 1, 5,
                     lambda e, ti, k, ci, s: 0.1 * (ti + 1) + 0.01 * k + (0.05 * ci if e == "model" else 0.0),
                     {}, "name: sines\n", proxied=True)
    f = load_sweep("sines", uri)
    assert f["error"].notna().all() and sweep_file("sines", uri) == ("sines.yaml", "name: sines\n")
    m = coverage_map(f, None, None, k="all", relative_to="bayes_task")  # defaults: freq_band x freq
    assert (m.coverage, m.test_axis) == ("freq_band", "freq")
    assert list(m.mean.index) == ["[1, 2]", "[0.5, 3]"] and list(m.mean.columns) == [0.25, 1.5, 4.0]
    assert m.support.to_numpy().tolist() == [[False, True, False], [False, True, False]]
    assert m.mean.loc["[0.5, 3]", 4.0] == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="model selection"):
        model_selection(f)
    assert main(["analyze", "heatmap", "--sweep", "sines", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    parent = f.attrs["parent_run_id"]
    logged = list((store_root / "artifacts" / "sines" / parent / "artifacts" / "analysis").glob("*.png"))
    assert len(logged) == 1 and "logged" in capsys.readouterr().out


def test_analysis_never_imports_ray():
    code = ("import sys; import analysis.cli, analysis.load, analysis.maps, analysis.figures, analysis.report; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]


def test_figures_speak_in_labels_not_ids():
    from analysis import figures

    assert figures.short_label("sparse_linear(nnz=1)") == "sparse linear (1 non-zero)"
    assert figures.short_label("mixture(0.5*linear+0.5*sparse_linear(nnz=1))") == \
        "0.5 linear + 0.5 sparse linear (1 non-zero)"
    assert figures.short_label("sine(freq_lo=0.5,freq_hi=3.0)") == "sine (ω = 0.5–3)"
    assert figures.axis_label("weight:sparse_linear(nnz=1)") == "pretraining weight of sparse linear (1 non-zero)"
    assert figures.short_label("[1, 2]") == "[1, 2]" and figures.short_label(0.25) == "0.25"
    # wrapped between words, never inside one
    wrapped = figures._wrap("0.5 linear + 0.5 sparse linear (1 non-zero)", 16).split("\n")
    assert all(len(line) <= 16 for line in wrapped) and " ".join(wrapped).split() == \
        "0.5 linear + 0.5 sparse linear (1 non-zero)".split()
    assert figures._wrap("sparse_linear(nnz=1)", 8) == "sparse_linear(nnz=1)"


@pytest.mark.parametrize("values, cmap", [([0.1, 0.5, 1.4], "Reds"), ([-0.3, -0.1], "Blues_r"),
                                          ([-0.2, 0.4], "RdBu_r")])
def test_heatmap_colour_scale_fits_the_data(values, cmap):
    from types import SimpleNamespace

    from analysis import figures

    m = SimpleNamespace(relative_to="bayes_task", mode="excess")
    norm, name = figures._norm(m, np.array(values))
    assert name == cmap
    assert norm(min(values)) >= 0 and norm(max(values)) <= 1
