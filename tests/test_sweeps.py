"""Sweeps end to end: real local Ray, a real `mlflow server` on 127.0.0.1, real files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import yaml
from conftest import ROOT, cli_env, run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

BASE = {
    "data": {"dim": 3, "n_points": 6},
    "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
    "train": {"steps": 60, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 20, "log_every": 10, "grad_clip": 0.0},
    "eval": {"n_prompts": 32, "estimators": ["model", "zero", "ols", "bayes_pretrain", "bayes_task"],
             "tasks": [{"family": "linear"}, {"family": "sparse_linear", "nnz": 1}]},
}


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"base": BASE, **fields}, sort_keys=False))
    return path


def trial_runs(uri: str, sweep: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[sweep], filter_string="tags.`iclmix.role` = 'trial'")


def metric_steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_sweep_tracks_every_trial_retries_faults_and_extends(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    sweep = write_sweep(tmp_path / "e2e.yaml", name="e2e", grid={"train.lr": [1e-3, 1e30]}, seeds=[0, 1])
    faults = tmp_path / "faults"
    r = run_cli("sweep", "run", sweep, "--tracking-uri", uri, "--storage", tmp_path / "store", timeout=900,
                env={"ICLMIX_FAULT_ONCE": f"{faults}:20"})
    # lr = 1e30 makes the loss non-finite: those trials fail for good, the sweep says so and exits non-zero.
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 FAILED" in r.stdout and "non-finite" in r.stdout

    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    parent = mlflow.search_runs(experiment_names=["e2e"], filter_string="tags.`iclmix.role` = 'parent'")
    assert len(parent) == 1
    runs = trial_runs(uri, "e2e")
    assert len(runs) == 4 and runs["tags.iclmix.config_hash"].nunique() == 4
    assert set(runs["tags.mlflow.parentRunId"]) == {parent.run_id[0]}
    for tag in ("iclmix.sweep", "iclmix.cell", "iclmix.seed", "iclmix.config_hash", "iclmix.git_commit"):
        assert runs[f"tags.{tag}"].notna().all(), tag
    assert sorted(runs["tags.iclmix.seed"]) == ["0", "0", "1", "1"]
    ok = runs[runs.status == "FINISHED"]
    bad = runs[runs.status == "FAILED"]
    assert len(ok) == 2 and len(bad) == 2
    assert set(bad["params.train.lr"]) == {"1e+30"} and set(ok["params.train.lr"]) == {"0.001"}
    assert bad["tags.iclmix.error"].str.contains("non-finite").all()
    assert "params.data.mixture" in runs and "params.model.n_embd" in runs
    assert ok["metrics.eval_loss"].between(0, 5).all()

    # MLflow as its users read it: a training experiment, runs named by what they are, MLflow's own source
    # tags, one eval value per run (no step axis), each trial's ICL curves, and the sweep's shape on the parent.
    assert client.get_experiment_by_name("e2e").tags["mlflow.experimentKind"] == "custom_model_development"
    assert sorted(runs["tags.mlflow.runName"]) == ["lr=0.001 · s0", "lr=0.001 · s1", "lr=1e+30 · s0", "lr=1e+30 · s1"]
    for tag in ("mlflow.user", "mlflow.source.name", "mlflow.source.git.commit"):
        assert runs[f"tags.{tag}"].notna().all() and parent[f"tags.{tag}"].notna().all(), tag
    assert (runs["tags.mlflow.source.git.commit"] == runs["tags.iclmix.git_commit"]).all()
    parent_run = client.get_run(parent.run_id[0])
    assert parent_run.data.params["sweep.trials"] == "4" and parent_run.data.params["sweep.seeds"] == "[0, 1]"
    assert parent_run.data.params["base.model.n_embd"] == "8"
    assert parent_run.data.metrics["trials_finished"] == 2 and parent_run.data.metrics["trials_failed"] == 2
    assert 0 < parent_run.data.metrics["eval_loss/lr:0.001"] < 5  # the cell's mean over its finished seeds
    for run_id in ok.run_id:
        assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [0]
        assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/icl_curves.png"]

    # Each good trial raised once after its step-20 checkpoint, was retried by Ray from that checkpoint,
    # and logged each training step exactly once to the same run.
    assert len(list(faults.iterdir())) == 2
    assert set(ok["tags.iclmix.resumed_from"]) == {"ray"}
    for run_id in ok.run_id:
        assert metric_steps(client, run_id) == [1, 10, 20, 30, 40, 50, 60]
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "eval.csv", "checkpoint.pt", "metrics.csv"} <= names
        table = pd.read_csv(client.download_artifacts(run_id, "eval.csv", str(tmp_path)))
        assert list(table.columns) == ["task", "k", "estimator", "error", "ci_low", "ci_high", "n_prompts"]
        assert set(table.estimator) == {"model", "zero", "ols", "bayes_pretrain", "bayes_task"}

    # Extending the seeds runs only the new trials; finished runs are untouched, failed ones re-attach.
    before = ok.set_index("run_id")["end_time"]
    write_sweep(tmp_path / "e2e.yaml", name="e2e", grid={"train.lr": [1e-3, 1e30]}, seeds=[0, 1, 2])
    r = run_cli("sweep", "run", sweep, "--storage", tmp_path / "store", timeout=900,
                env={"MLFLOW_TRACKING_URI": uri})  # MLflow's own variable, when --tracking-uri is absent
    assert r.returncode == 1
    assert "6 trials, 2 already finished" in r.stdout
    runs = trial_runs(uri, "e2e")
    assert len(runs) == 6 and runs["tags.iclmix.config_hash"].nunique() == 6
    assert (runs.status == "FINISHED").sum() == 3
    after = runs.set_index("run_id")["end_time"]
    for run_id, end in before.items():
        assert after[run_id] == end  # not trained again


def test_bundled_sweep_trains_each_config_as_its_own_run_and_resumes_every_member(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    sweep = write_sweep(tmp_path / "bundled.yaml", name="bundled", grid={"train.lr": [1e-3, 1e30]}, seeds=[0, 1],
                        resources={"cpu": 1, "bundle": 4})
    faults = tmp_path / "faults"
    r = run_cli("sweep", "run", sweep, "--tracking-uri", uri, "--storage", tmp_path / "store", timeout=900,
                env={"ICLMIX_FAULT_ONCE": f"{faults}:20"})
    # The four configs share one shape: one Ray trial trains them; the two at lr = 1e30 are frozen and fail alone.
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 FAILED" in r.stdout and "2 FINISHED" in r.stdout and "non-finite" in r.stdout
    trial_dirs = [d.name for d in (tmp_path / "store" / "bundled" / "ray").glob("*/*") if d.is_dir()]
    assert len(trial_dirs) == 1 and trial_dirs[0].endswith("+3"), trial_dirs

    client = MlflowClient(uri)
    runs = trial_runs(uri, "bundled")
    assert len(runs) == 4 and runs["tags.iclmix.config_hash"].nunique() == 4  # each config its own run, once
    ok, bad = runs[runs.status == "FINISHED"], runs[runs.status == "FAILED"]
    assert set(ok["params.train.lr"]) == {"0.001"} and set(bad["params.train.lr"]) == {"1e+30"}
    assert bad["tags.iclmix.error"].str.contains("non-finite").all()
    assert ok["metrics.eval_loss"].between(0, 5).all()
    # Each good member raised once after its step-20 checkpoint; the retried bundle resumed every member from
    # its own checkpoint and logged each training step exactly once, to that member's run.
    assert len(list(faults.iterdir())) == 2
    assert set(ok["tags.iclmix.resumed_from"]) <= {"ray", "store"}
    for run_id in ok.run_id:
        assert metric_steps(client, run_id) == [1, 10, 20, 30, 40, 50, 60]
        assert {"config.yaml", "eval.csv", "checkpoint.pt", "metrics.csv"} <= {a.path for a in
                                                                              client.list_artifacts(run_id)}

    # Rerunning skips the finished members; the failed ones are tried again (and fail again).
    before = ok.set_index("run_id")["end_time"]
    r = run_cli("sweep", "run", sweep, "--tracking-uri", uri, "--storage", tmp_path / "store", timeout=900)
    assert r.returncode == 1 and "4 trials, 2 already finished" in r.stdout
    runs = trial_runs(uri, "bundled")
    assert len(runs) == 4 and (runs.status == "FINISHED").sum() == 2
    after = runs.set_index("run_id")["end_time"]
    assert all(after[run_id] == end for run_id, end in before.items())
    for run_id in runs.run_id:  # the frozen members' rows past their checkpoint were not logged, so none twice
        logged = metric_steps(client, run_id)
        assert logged == sorted(set(logged)), logged
    for run_id in ok.run_id:  # a finished member is evaluated once
        assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [0]


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


@pytest.mark.parametrize("bundle", [1, 3], ids=["solo", "bundle3"])
def test_driver_killed_mid_sweep_resumes_each_trial_once(tmp_path, mlflow_server, bundle):
    """Solo trials, or the three configs as one bundled trial: each resumes from its checkpoint, logs once."""
    uri = mlflow_server.uri
    name = f"killme_{bundle}"  # the server is shared: each variant its own experiment
    # Long enough that a trial with a checkpoint is still training when the driver dies, however fast the machine.
    steps = 3000
    base = {**BASE, "train": {**BASE["train"], "steps": steps, "checkpoint_every": 100, "log_every": 100}}
    sweep = tmp_path / "kill.yaml"
    sweep.write_text(yaml.safe_dump({"name": name, "base": base, "seeds": [0, 1, 2],
                                     "grid": {"model.n_embd": [8]}, "resources": {"cpu": 1, "bundle": bundle}}))
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "iclmix", "sweep", "run", str(sweep), "--tracking-uri", uri, "--storage", str(store)]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    ckpts = store / name / "checkpoints"
    while time.monotonic() < deadline and not (ckpts.exists() and any(ckpts.glob("*/checkpoint.pt"))):
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    time.sleep(1.0)
    family = psutil.Process(driver.pid).children(recursive=True)
    temp_dirs = {m for p in family for m in re.findall(r"/tmp/iclray-[A-Za-z0-9_]+", _name(p))}
    assert len(temp_dirs) == 1 and Path(temp_dirs.pop()).is_dir()
    temp_dir = next(m for p in family for m in re.findall(r"/tmp/iclray-[A-Za-z0-9_]+", _name(p)))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # Ray's local runtime shares the driver's fate: no raylet, GCS, trial worker, dashboard or runtime-env agent
    # may outlive it (none may keep training behind a rerun's back), and its temp dir goes with it.
    _, alive = psutil.wait_procs(family, timeout=60)
    alive = [(p, _name(p)) for p in alive if _running(p)]  # a zombie is dead, merely not yet reaped
    for p, _ in alive:  # stop leftovers by PID
        p.kill()
    assert not alive, [name for _, name in alive]
    assert not Path(temp_dir).exists()
    before = trial_runs(uri, name)
    finished = set(before.loc[before.status.eq("FINISHED"), "tags.iclmix.config_hash"])
    interrupted = {p.parent.name for p in ckpts.glob("*/checkpoint.pt")} - finished
    assert interrupted, "no trial was killed between two checkpoints"

    r = run_cli("sweep", "run", sweep, "--tracking-uri", uri, "--storage", store, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = trial_runs(uri, name)
    assert len(runs) == 3 and runs["tags.iclmix.config_hash"].nunique() == 3
    assert (runs.status == "FINISHED").all()
    resumed = runs.set_index("tags.iclmix.config_hash")["tags.iclmix.resumed_from"]
    assert {h: resumed[h] for h in interrupted} == dict.fromkeys(interrupted, "store")  # not from step 0
    client = MlflowClient(uri)
    for run_id in runs.run_id:
        assert metric_steps(client, run_id) == [1, *range(100, steps + 1, 100)]  # each step logged once, none lost
    if bundle > 1:  # and the three configs trained as one Ray trial each round
        assert all(d.name.endswith("+2") for d in (store / name / "ray").glob("*/*") if d.is_dir())


def test_optuna_searches_inside_each_cell(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    sweep = write_sweep(
        tmp_path / "opt.yaml", name="opt", seeds=[0],
        grid={"data.mixture": {"simplex": {"components": [{"family": "linear"}, {"family": "sparse_linear", "nnz": 1}],
                                           "steps": 1}}},
        tune={"params": {"train.lr": {"loguniform": [1e-4, 3e-3]}}, "trials_per_cell": 2,
              "metric": "eval/sparse_linear(nnz=1)"},  # a per-task metric: MLflow spells it sparse_linear.nnz:1
    )
    r = run_cli("sweep", "run", sweep, "--tracking-uri", uri, "--storage", tmp_path / "store", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    cells = mlflow.search_runs(experiment_names=["opt"], filter_string="tags.`iclmix.role` = 'cell'")
    parent = mlflow.search_runs(experiment_names=["opt"], filter_string="tags.`iclmix.role` = 'parent'")
    assert len(cells) == 2 and set(cells["tags.mlflow.parentRunId"]) == {parent.run_id[0]}
    assert cells["metrics.best_eval/sparse_linear.nnz:1"].notna().all()
    runs = trial_runs(uri, "opt")
    assert len(runs) == 4 and (runs.status == "FINISHED").all()
    # every family of the sweep has a weight on every run, zeros included
    weights = runs[["params.data.mixture.weight.linear", "params.data.mixture.weight.sparse_linear.nnz:1"]]
    assert sorted(map(tuple, weights.to_numpy())) == [("0.0", "1.0")] * 2 + [("1.0", "0.0")] * 2
    assert set(runs["tags.mlflow.runName"].str.replace(r" · optuna \d+$", "", regex=True)) == {
        "linear=1 · s0", "sparse_linear(nnz=1)=1 · s0"}
    for cell_run, cell_id in zip(cells.run_id, cells["tags.iclmix.cell"]):
        children = runs[runs["tags.mlflow.parentRunId"] == cell_run]
        assert len(children) == 2 and set(children["tags.iclmix.cell"]) == {cell_id}
        assert children["params.train.lr"].nunique() == 2


def test_optuna_search_whose_trials_all_fail_is_a_failure_with_its_reason(tmp_path, mlflow_server):
    sweep = write_sweep(tmp_path / "optfail.yaml", name="optfail", seeds=[0],
                        tune={"params": {"train.lr": {"loguniform": [1e29, 1e30]}}, "trials_per_cell": 2})
    r = run_cli("sweep", "run", sweep, "--tracking-uri", mlflow_server.uri, "--storage", tmp_path / "store",
                timeout=900)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 FAILED" in r.stdout and "non-finite" in r.stdout
    assert "FAILED Optuna search of cell" in r.stdout and "none of its 2 Optuna trial(s)" in r.stdout
    mlflow.set_tracking_uri(mlflow_server.uri)
    runs = {role: mlflow.search_runs(experiment_names=["optfail"], filter_string=f"tags.`iclmix.role` = '{role}'")
            for role in ("parent", "cell")}
    assert list(runs["parent"].status) == ["FAILED"] and list(runs["cell"].status) == ["FAILED"]
    assert "none of its 2 Optuna trial(s)" in runs["cell"]["tags.iclmix.error"][0]


def _start_sweep(sweep: Path, uri: str, store: Path) -> subprocess.Popen:
    """`iclmix sweep run` in its own process group, as a terminal runs it (Ctrl-C signals the whole group)."""
    cmd = [sys.executable, "-m", "iclmix", "sweep", "run", str(sweep), "--tracking-uri", uri, "--storage", str(store)]
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_a_new_checkpoint(driver: subprocess.Popen, ckpts: Path) -> None:
    """Until a trial of this driver has stored a checkpoint (so it is running, its MLflow run RUNNING)."""
    start, deadline = time.time(), time.monotonic() + 300
    while not any(p.stat().st_mtime > start for p in ckpts.glob("*/checkpoint.pt")):
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)


def test_ctrl_c_and_sigterm_mark_the_sweep_killed_exit_130_and_rerunning_resumes(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    base = {**BASE, "train": {**BASE["train"], "steps": 600, "checkpoint_every": 25, "log_every": 25}}
    sweep = tmp_path / "stop.yaml"
    sweep.write_text(yaml.safe_dump({"name": "stopme", "base": base, "seeds": [0, 1, 2],
                                     "grid": {"model.n_embd": [8]}}))
    store = tmp_path / "store"
    ckpts = store / "stopme" / "checkpoints"
    mlflow.set_tracking_uri(uri)
    for how, sig in (("ctrl-c", signal.SIGINT), ("sigterm", signal.SIGTERM)):
        driver = _start_sweep(sweep, uri, store)
        _wait_for_a_new_checkpoint(driver, ckpts)
        if how == "ctrl-c":
            os.killpg(driver.pid, sig)  # what a terminal sends: the driver and every process it started
        else:
            driver.send_signal(sig)  # what a scheduler or `kill` sends: the driver only
        out, err = driver.communicate(timeout=180)
        assert driver.returncode == 130, (how, out[-2000:], err[-3000:])
        assert "interrupted" in err and "run the same command to resume" in err, (how, err[-3000:])
        assert "Tuner.restore" not in out + err, how  # Tune's advice would not resume an iclmix sweep
        parent = mlflow.search_runs(experiment_names=["stopme"], filter_string="tags.`iclmix.role` = 'parent'")
        assert list(parent.status) == ["KILLED"], how
        runs = trial_runs(uri, "stopme")
        assert len(runs) >= 1 and runs.status.isin(["FINISHED", "KILLED"]).all(), (how, list(runs.status))
        assert (runs.status == "KILLED").any(), how

    r = run_cli("sweep", "run", sweep, "--tracking-uri", uri, "--storage", store, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done: 3 FINISHED" in r.stdout
    runs = trial_runs(uri, "stopme")
    assert len(runs) == 3 and runs["tags.iclmix.config_hash"].nunique() == 3 and (runs.status == "FINISHED").all()
    assert "store" in set(runs["tags.iclmix.resumed_from"])  # continued from its checkpoint, not step 0
    parent = mlflow.search_runs(experiment_names=["stopme"], filter_string="tags.`iclmix.role` = 'parent'")
    assert list(parent.status) == ["FINISHED"]
    client = MlflowClient(uri)
    for run_id in runs.run_id:
        steps = metric_steps(client, run_id)
        assert steps == sorted(set(steps)) and steps[-1] == 600  # each step logged once


def test_mlflow_ui_opens_the_sweep_on_its_runs_named_by_what_they_are(tmp_path, mlflow_server):
    # In a real browser (headless Chromium) on the real MLflow UI: the experiment opens on its runs table (not
    # MLflow's GenAI trace pages) and the trials read as the mixtures they were pretrained on.
    from test_analysis import _chromium

    uri = mlflow_server.uri
    sweep = write_sweep(tmp_path / "ui.yaml", name="uisweep", seeds=[0],
                        grid={"data.mixture": {"simplex": {"components": [{"family": "linear"},
                                                                          {"family": "sparse_linear", "nnz": 1}],
                                                           "steps": 1}}})
    r = run_cli("sweep", "run", sweep, "--tracking-uri", uri, "--storage", tmp_path / "store", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = MlflowClient(uri).get_experiment_by_name("uisweep")
    exe = _chromium()
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
              "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'p'}",
              "--window-size=1600,1000", "--virtual-time-budget=20000"]

    def dom(page: str) -> str:
        return subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout

    # The link the sweep prints opens the runs table (MLflow 3's model-training pages, not its GenAI ones).
    link = re.search(r"http://\S+#/experiments/\d+\?workflowType=machine_learning", r.stdout)
    assert link, r.stdout[-2000:]
    table = dom(link.group(0))
    assert "Run Name" in table and re.search(r"<strong>3</strong>\s*matching runs", table), table[-3000:]
    assert "uisweep" in table
    runs = trial_runs(uri, "uisweep")
    for run_id, name in zip(runs.run_id, runs["tags.mlflow.runName"]):
        assert name in dom(f"{uri}/#/experiments/{exp.experiment_id}/runs/{run_id}?workflowType=machine_learning")
    assert sorted(runs["tags.mlflow.runName"]) == ["linear=1 · s0", "sparse_linear(nnz=1)=1 · s0"]
    shot = tmp_path / "mlflow-runs.png"
    subprocess.run([*common, f"--screenshot={shot}", link.group(0)], capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 10_000

    # The console: one kind of progress line, a results table at the end, none of Ray's chatter.
    out = r.stdout + r.stderr
    assert "finished 2/2" in r.stdout and "elapsed" in r.stdout and "best eval_loss" in r.stdout
    table_rows = [line for line in r.stdout.splitlines() if line.startswith(("linear=1 ", "sparse_linear(nnz=1)=1 "))]
    assert len(table_rows) == 2 and all("FINISHED" in line for line in table_rows), r.stdout
    for chatter in ("Checkpoint successfully created", "TensorBoard", "Tuner.restore", "View run", "INFO"):
        assert chatter not in out, chatter
    assert len(r.stdout.splitlines()) < 20 and not r.stderr.strip(), out


def test_progress_line_counts_a_failed_bundles_finished_members_as_finished(tmp_path):
    """A bundled Ray trial that errors for good after one member FINISHED (evaluated, its run ended): the live
    line says 1 finished and 1 failed, as MLflow and the exit status do, not 2 failed."""
    from ray.tune.experiment import Trial

    from sweeps import layout
    from sweeps import tracking as tr
    from sweeps.runner import Progress, _callback

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tr.experiment_id(client, "p")
    for key, status in (("aaaa", "FINISHED"), ("bbbb", "FAILED")):
        run_id = tr.ensure_run(client, exp, sweep="p", role="trial", name=key, match={"config_hash": key},
                               tags={layout.TAG_HASH: key})
        tr.end_run(client, run_id, status)
    progress = Progress("p", total=3, already=0)
    callback = _callback(progress, [("aaaa", "bbbb"), ("cccc",)], lambda: tr.finished_hashes(client, exp, "p"))
    bundle, solo = Trial("fn", config={"trial": 0}, stub=True), Trial("fn", config={"trial": 1}, stub=True)
    for trial in (bundle, solo):
        callback.on_trial_start(0, [], trial)
    callback.on_trial_error(0, [], bundle)
    assert (progress.done, progress.failed) == (1, 1)
    assert "finished 1/3" in progress.line() and "training 1" in progress.line() and "failed 1" in progress.line()
    callback.on_trial_error(0, [], solo)  # nothing of it finished
    assert (progress.done, progress.failed) == (1, 2)
