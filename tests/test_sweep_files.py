"""Sweep files: expansion, hashing, `sweep plan`, and bad input stopped before anything launches."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_cli

from icl_core.config import ConfigError
from sweeps.spec import load_sweep, simplex_points, tune_metrics

BASE = {
    "data": {"dim": 5, "n_points": 11},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {"steps": 200, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 50},
}
SIMPLEX = {"simplex": {"components": [{"family": "linear"}, {"family": "sparse_linear", "nnz": 1}], "steps": 4}}


def sweep(**fields) -> dict:
    return {"name": "t", "base": BASE, "grid": {"data.mixture": SIMPLEX, "model.n_layer": [2, 4]}, "seeds": [0, 1],
            **fields}


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_simplex_lattice():
    assert len(simplex_points(2, 4)) == 5 and len(simplex_points(3, 2)) == 6
    assert all(sum(p) == 1 for p in simplex_points(3, 4))


def test_grid_expands_cells_times_seeds_with_unique_hashes(tmp_path):
    spec, trials = load_sweep(write(tmp_path, sweep()))
    assert len(trials) == 5 * 2 * 2
    assert len({t.hash for t in trials}) == 20 and len({t.cell.id for t in trials}) == 10
    weights = sorted({t.config.data.family.weight_of("sparse_linear(nnz=1)") for t in trials})
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0]
    # The hash depends on the resolved run, not on how the sweep file spelled it.
    again = sweep(grid={"model.n_layer": [2, 4], "data.mixture": SIMPLEX})
    assert {t.hash for t in load_sweep(write(tmp_path, again))[1]} == {t.hash for t in trials}


def test_plan_prints_cells_trials_and_compute(tmp_path):
    r = run_cli("sweep", "plan", write(tmp_path, sweep(tune={"params": {"train.lr": {"loguniform": [1e-4, 3e-3]}},
                                                             "trials_per_cell": 4})))
    assert r.returncode == 0, r.stderr
    assert "10 cells x 2 seeds x 4 Optuna samples = 80 trials" in r.stdout
    assert "model FLOPs" in r.stdout and r.stdout.count("  cell ") == 10


def test_plan_estimates_wall_time_for_the_resources_given(tmp_path):
    from sweeps.spec import CPU_CORE_FLOPS, duration_text, flops_per_trial, plan_text

    spec, trials = load_sweep(write(tmp_path, sweep()))  # 20 one-CPU trials
    total = sum(flops_per_trial(t.config) for t in trials)
    one, four = plan_text(spec, trials, cpus=1), plan_text(spec, trials, cpus=4)
    assert "on 1 CPU cores (1 trial(s) at once)" in one and "on 4 CPU cores (4 trial(s) at once)" in four
    assert one.endswith(": " + duration_text(total / CPU_CORE_FLOPS))  # one core trains every trial in turn
    gpu_spec, gpu_trials = load_sweep(write(tmp_path, sweep(resources={"cpu": 1, "gpu": 0.25})))
    lines = plan_text(gpu_spec, gpu_trials, gpus=2).splitlines()[-1]
    assert "GPU-hours" in lines and "on 2 GPU(s) (8 trial(s) at once)" in lines
    r = run_cli("sweep", "plan", write(tmp_path, sweep()), "--cpus", "-1")
    assert r.returncode == 2 and "--cpus" in r.stderr


def test_shipped_sweep_files_are_valid():
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert any(f.name == "quickstart.yaml" for f in files)
    for f in files:
        load_sweep(f)


BAD = [
    ({k: v for k, v in sweep().items() if k != "name"}, "name"),
    (sweep(name="bad name!"), "name"),
    (sweep(typo=1), "typo"),
    (sweep(seeds=[0, 0]), "seeds"),
    (sweep(seeds=[]), "seeds"),
    (sweep(base={**BASE, "model": {"n_layer": 2, "n_head": 3, "n_embd": 32}}), "base.model.n_embd"),
    (sweep(grid={"data.mixture": {"simplex": {"components": [{"family": "cubic"}, {"family": "linear"}],
                                               "steps": 2}}}), "grid.data.mixture.simplex.components[0].family"),
    (sweep(grid={"data.mixture": {"simplex": {"components": [{"family": "linear"}], "steps": 2}}}),
     "grid.data.mixture.simplex.components"),
    (sweep(grid={"data.mixture": [[{"family": "linear", "weight": 0.7}, {"family": "sine", "weight": 0.7}]]}),
     "data.mixture.weight"),
    (sweep(grid={"data.mixture": [[{"family": "sparse_linear", "nnz": 9}]]}), "data.mixture[0].nnz"),
    (sweep(grid={"model.n_layer": []}), "grid.model.n_layer"),
    (sweep(grid={"train.stepz": [1, 2]}), "train.stepz"),
    (sweep(tune={"params": {"train.lr": {"lognormal": [1, 2]}}}), "tune.params.train.lr.lognormal"),
    (sweep(tune={"params": {"train.lr": {"loguniform": [3e-3, 1e-4]}}}), "tune.params"),
    (sweep(tune={"params": {"train.lrr": {"uniform": [0.1, 0.2]}}}), "train.lrr"),
    (sweep(resources={"cpu": 0}), "resources.cpu"),
    (sweep(resources={"bundle": 0}), "resources.bundle"),
    # Four paper-size configs at batch 1024 fit the per-trial limit one by one (about 23 GiB), not as one bundle.
    (sweep(base={"model": {"n_layer": 12, "n_head": 8, "n_embd": 256}, "train": {"steps": 10, "batch_size": 1024}},
           grid={}, seeds=[0, 1, 2, 3], resources={"bundle": 4}), "resources.bundle"),
    (sweep(checks={"finding": "magic"}), "checks.finding"),
    (sweep(checks={"finding": "model_selection", "family_a": "linear", "family_b": "sparse_linear(nnz=1)",
                   "rel_tol": -0.1}), "checks.rel_tol"),
    (sweep(checks={"finding": "interpolation", "test_nnz": [2, 3]}), "checks.mixture"),
    (sweep(checks={"finding": "frequency_extremes", "mixture": "m", "min_ratoi": 3}), "checks.min_ratoi"),
    (sweep(checks={"finding": "coverage", "outside": ["sine(freq_lo=1.0,freq_hi=1.0)"]}), "checks.outside[0]"),
    (sweep(checks={"finding": "coverage", "outside": []}), "checks.outside"),
    (sweep(checks={"finding": "coverage", "outside": ["linear"], "max_excess": -1}), "checks.max_excess"),
    # Unquoted in a YAML flow list, a family id splits at its commas: named, not run and then failed.
    ("name: t\nbase: {data: {dim: 2}, eval: {tasks: [{family: sine, freq_lo: 1.0, freq_hi: 1.0}]}}\n"
     "checks: {finding: coverage, outside: [sine(freq_lo=1.0,freq_hi=1.0)]}\n", "checks.outside[0]"),
    # Names a finished sweep is read back by: a typo stops here, not after the sweep ran.
    (sweep(tune={"params": {"train.lr": {"loguniform": [1e-4, 3e-3]}}, "metric": "eval_los"}), "tune.metric"),
    (sweep(checks={"finding": "model_selection", "family_a": "linaer", "family_b": "sparse_linear(nnz=1)"}),
     "checks.family_a"),
    (sweep(checks={"finding": "model_selection", "family_a": "linear", "family_b": "sparse_linear(nnz=2)"}),
     "checks.family_b"),
    (sweep(checks={"finding": "interpolation", "mixture": "mixture(0.5*linear)", "test_nnz": [2]}),
     "checks.mixture"),
    (sweep(checks={"finding": "interpolation", "mixture": "mixture(0.5*linear+0.5*sparse_linear(nnz=1))",
                   "test_nnz": [2], "low": "lassso"}), "checks.low"),
    (sweep(checks={"finding": "convex_combination", "reference": "bayes"}), "checks.reference"),
    (sweep(base={**BASE, "eval": {"estimators": ["model", "zero"]}}, checks={"finding": "interpolation",
           "mixture": "mixture(0.5*linear+0.5*sparse_linear(nnz=1))", "test_nnz": [2]}), "checks.low"),
    ("name: t\nbase: {data: {dim: 5\n", "sweep.yaml"),
]


@pytest.mark.parametrize("data, field", BAD, ids=[b[1] for b in BAD])
def test_malformed_sweep_files_raise_one_line_naming_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, data))
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data, field", [BAD[2], BAD[6], BAD[8], BAD[9], BAD[-1]],
                         ids=["key", "family", "weights", "nnz", "yaml"])
def test_cli_rejects_malformed_sweep_files_with_exit_2_before_launching(tmp_path, data, field):
    path = write(tmp_path, data)
    for command in ("plan", "run"):
        r = run_cli("sweep", command, path, "--storage", tmp_path / "store") if command == "run" else \
            run_cli("sweep", command, path)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0] and "Traceback" not in r.stderr, lines
    assert not (tmp_path / "store").exists()  # nothing launched, nothing written


def test_names_a_sweep_produces_are_accepted(tmp_path):
    # The other side of the typo cases: a per-task metric and the names of this sweep's mixtures pass.
    mix = "mixture(0.5*linear+0.5*sparse_linear(nnz=1))"
    ok = sweep(tune={"params": {"train.lr": {"loguniform": [1e-4, 3e-3]}}, "metric": "eval/sparse_linear(nnz=1)"},
               checks={"finding": "interpolation", "mixture": mix, "test_nnz": [1], "low": "lasso", "high": "ols"})
    spec, trials = load_sweep(write(tmp_path, ok))
    assert mix in {t.config.data.family.canonical_id for t in trials}
    assert tune_metrics(trials) == ["eval_loss", "eval/linear", "eval/sparse_linear(nnz=1)", "train/loss"]


def test_missing_sweep_file(tmp_path):
    r = run_cli("sweep", "plan", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.parametrize("resources, field", [({"cpu": 1000}, "resources.cpu"), ({"gpu": 64}, "resources.gpu")])
def test_trial_larger_than_this_machine_exits_2_before_launching(tmp_path, resources, field):
    # The private local runtime has only this machine: such a trial would wait forever.
    r = run_cli("sweep", "run", write(tmp_path, sweep(resources=resources)), "--storage", tmp_path / "store")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "--address" in lines[0], lines
    assert not (tmp_path / "store").exists()


def test_trial_larger_than_this_machines_memory_exits_2_before_launching(tmp_path):
    import psutil

    from icl_core.config import MAX_TRIAL_GIB, memory_estimate, validate_run_config

    ram = psutil.virtual_memory().total
    if ram > 0.9 * MAX_TRIAL_GIB * 2**30:
        pytest.skip("this machine has about as much memory as the per-trial limit allows")
    batch = 32
    while sum(memory_estimate(validate_run_config({**BASE, "train": {**BASE["train"], "batch_size": batch}}))
              .values()) < 1.1 * ram:
        batch *= 2
    spec = {"name": "big", "base": {**BASE, "train": {**BASE["train"], "batch_size": batch}}}
    r = run_cli("sweep", "run", write(tmp_path, spec), "--storage", tmp_path / "store")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.batch_size" in lines[0] and "this machine's" in lines[0], lines
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("args, field", [
    (["--tracking-uri", "http://127.0.0.1:1"], "--tracking-uri"),
    (["--address", "127.0.0.1:1"], "--address"),
    (["--address", "ray://127.0.0.1:1"], "--address"),
    (["--storage", "FILE"], "--storage"),
    (["--storage", "FILE/under"], "--storage"),
], ids=["tracking-uri", "address", "ray-client", "storage-file", "storage-under-file"])
def test_unreachable_services_and_bad_places_fail_in_seconds_before_anything_starts(tmp_path, args, field):
    (tmp_path / "a-file").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "a-file")) for a in args]
    store = [] if "--storage" in args else ["--storage", tmp_path / "store"]
    start = time.monotonic()
    r = run_cli("sweep", "run", write(tmp_path, sweep()), *args, *store)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"iclmix: error: {field}: "), lines
    assert time.monotonic() - start < 30  # not Ray's minute of retries, nor MLflow's minutes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "sweep.yaml"]  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_gpu_sweep_without_a_gpu_exits_2_before_launching(tmp_path):
    r = run_cli("sweep", "run", ROOT / "sweeps" / "gpu_packing.yaml", "--storage", tmp_path / "store")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "resources.gpu" in lines[0] and "no CUDA GPU" in lines[0], lines
    assert not (tmp_path / "store").exists()  # no Ray runtime, no MLflow store
