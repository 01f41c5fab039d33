"""Sweeps across the nodes of a real multi-node Ray cluster on one host (`ray.cluster_utils.Cluster`): a CPU
head and two worker nodes with faked GPUs, a real `mlflow server` on 127.0.0.1 that every node reaches
through its URI, and storage that all nodes share (one host's disk) — or, for the last test, a node that
sees a different filesystem at the storage path (its own mount namespace)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import ROOT, cli_env, private_ray_tmpdir, run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

TINY = {"n_layer": 1, "n_head": 1, "n_embd": 8}
EVAL = {"n_prompts": 16, "estimators": ["model", "ols"], "tasks": [{"family": "linear"}]}
FRACTIONAL = {"cpu": 0.5, "gpu": 0.25}  # 4 trials per (fake) GPU and per 2-CPU worker


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, no GPU: trials never land there) + 2 workers with 2 CPUs and 1 fake GPU each."""
    from ray.cluster_utils import Cluster

    with private_ray_tmpdir() as temp_dir:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "temp_dir": temp_dir,
                                                          "include_dashboard": False})
        try:
            workers = [c.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
            c.wait_for_nodes()
            yield c, workers
        finally:
            c.shutdown()


def write_sweep(tmp_path, name: str, seeds: int, steps: int, checkpoint_every: int, **extra):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "base": {"data": {"dim": 3, "n_points": 6}, "model": TINY,
                 "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "checkpoint_every": checkpoint_every,
                           "log_every": 10},
                 "eval": EVAL},
        "seeds": list(range(seeds)),
        "resources": FRACTIONAL,
        **extra,
    }))
    return path


def trial_runs(uri: str, sweep: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[sweep], filter_string="tags.`iclmix.role` = 'trial'")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_fractional_gpu_trials_spread_over_nodes_and_pack_each_gpu(tmp_path, cluster, mlflow_server):
    c, workers = cluster
    sweep = write_sweep(tmp_path, "mn_pack", seeds=8, steps=300, checkpoint_every=100)
    r = run_cli("sweep", "run", sweep, "--address", c.address, "--tracking-uri", mlflow_server.uri,
                "--storage", tmp_path / "store", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = trial_runs(mlflow_server.uri, "mn_pack")
    assert len(runs) == 8 and (runs.status == "FINISHED").all()
    assert runs["tags.iclmix.config_hash"].nunique() == 8
    worker_ids = {w.node_id for w in workers}
    nodes = runs["tags.iclmix.ray_node"]
    assert set(nodes) == worker_ids, "8 quarter-GPU trials need both 4-slot workers, and never the GPU-less head"
    assert (runs["tags.iclmix.gpu_ids"] != "").all()  # each trial was given a (fractional) GPU
    packed = 0
    for _, grp in runs.groupby([nodes, runs["tags.iclmix.gpu_ids"]]):
        spans = [(s.timestamp(), e.timestamp()) for s, e in zip(grp.start_time, grp.end_time)]
        packed = max(packed, max_overlap(spans))
    assert packed >= 2, "no GPU ever ran two trials at once"


def _loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def _two_live_workers(c, workers: list) -> list:
    """The fixture's workers that are still up, topped up to two (an earlier test may have removed one)."""
    live = [w for w in workers if w in c.worker_nodes]
    while len(live) < 2:
        live.append(c.add_node(num_cpus=2, num_gpus=1))
        workers.append(live[-1])
    c.wait_for_nodes()
    return live


@pytest.mark.parametrize("bundle", [1, 2], ids=["solo", "bundle2"])
def test_worker_node_lost_mid_sweep_trials_resume_on_the_others(tmp_path, cluster, mlflow_server, bundle):
    """Solo trials, or bundles of two configs: those on the lost node resume elsewhere, each member once."""
    c, all_workers = cluster
    workers = _two_live_workers(c, all_workers)
    name = f"mn_loss_{bundle}"  # the server is shared: each variant its own experiment
    steps, every = 2500, 100
    sweep = write_sweep(tmp_path, name, seeds=4, steps=steps, checkpoint_every=every, max_failures=3,
                        resources={**FRACTIONAL, "bundle": bundle})
    cmd = [sys.executable, "-m", "iclmix", "sweep", "run", str(sweep), "--address", c.address,
           "--tracking-uri", mlflow_server.uri, "--storage", str(tmp_path / "store")]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    client = MlflowClient(mlflow_server.uri)
    by_id = {w.node_id: w for w in workers}
    victim = orphans = checkpointed = None
    try:
        deadline = time.monotonic() + 600
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            try:
                runs = trial_runs(mlflow_server.uri, name)
            except Exception:  # the experiment does not exist yet
                continue
            for _, run in runs[runs.status == "RUNNING"].iterrows():
                node = run.get("tags.iclmix.ray_node")
                steps_seen = _loss_steps(client, run.run_id)
                if node in by_id and steps_seen and steps_seen[-1] >= 2 * every:  # a checkpoint is stored
                    victim = node
                    break
        assert victim is not None, "no trial reached its second checkpoint on a worker"
        orphans = set(runs[(runs.status == "RUNNING") & (runs["tags.iclmix.ray_node"] == victim)].run_id)
        # A trial's metrics reach MLflow only after the checkpoint at that step is stored.
        checkpointed = {r for r in orphans if _loss_steps(client, r)}
        c.remove_node(by_id[victim])
        driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    out = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, out[-4000:]
    runs = trial_runs(mlflow_server.uri, name)
    assert len(runs) == 4 and (runs.status == "FINISHED").all(), runs[["run_id", "status"]]
    assert runs["tags.iclmix.config_hash"].nunique() == 4  # no trial duplicated in MLflow
    survivor = ({w.node_id for w in workers} - {victim}).pop()
    moved = runs[runs.run_id.isin(orphans)]
    assert len(moved) >= 1 and checkpointed
    assert (moved["tags.iclmix.ray_node"] == survivor).all()  # retried on the node that is left
    resumed = runs[runs.run_id.isin(checkpointed)]["tags.iclmix.resumed_from"]
    assert (resumed != "fresh").all(), resumed  # ... from its checkpoint, not from step 0
    for run_id in runs.run_id:  # every step logged exactly once, resumed or not
        assert _loss_steps(client, run_id) == [1, *range(10, steps + 1, 10)]


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


def _alive_nodes(address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes())); ray.shutdown()")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else -1


@pytest.mark.skipif(not _can_unshare(), reason="needs mount namespaces (unshare -m) to give a node its own disk")
def test_storage_that_a_node_cannot_see_stops_the_sweep_before_launch(tmp_path, cluster, mlflow_server):
    c, _ = cluster
    storage = tmp_path / "node-local"
    storage.mkdir()
    before = _alive_nodes(c.address)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    # A node whose view of the storage path is its own empty tmpfs: the driver's disk is not shared with it.
    script = f"mount -t tmpfs tmpfs {storage} && exec {ray} start --address {c.address} --num-cpus 1 --block"
    node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _alive_nodes(c.address) <= before:
            assert node.poll() is None and time.monotonic() < deadline, "the extra node did not join"
            time.sleep(1)
        sweep = write_sweep(tmp_path, "mn_unshared", seeds=2, steps=20, checkpoint_every=10)
        r = run_cli("sweep", "run", sweep, "--address", c.address, "--tracking-uri", mlflow_server.uri,
                    "--storage", storage, timeout=600)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        # Ray's own connection lines come first (the check needs the cluster); then one line for the user.
        err = [line for line in r.stderr.splitlines() if line.startswith("iclmix: error")]
        assert len(err) == 1 and err[0] == r.stderr.strip().splitlines()[-1], r.stderr[-3000:]
        assert "--storage" in err[0] and "not shared by every node" in err[0] and "1 of " in err[0], err
        assert not (storage / "mn_unshared" / "ray").exists()  # Tune never started
        mlflow.set_tracking_uri(mlflow_server.uri)
        assert mlflow.get_experiment_by_name("mn_unshared") is None  # nothing in MLflow either
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
