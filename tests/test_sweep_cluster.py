"""`sweep run --address` joins a running Ray cluster, also when submitted with `ray job submit`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest
import yaml
from conftest import ROOT, cli_env, private_ray_tmpdir, run_cli

pytestmark = pytest.mark.slow

BASE = {
    "data": {"dim": 3, "n_points": 6},
    "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
    "train": {"steps": 40, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 20, "log_every": 10},
    "eval": {"n_prompts": 16, "estimators": ["model", "zero", "ols"], "tasks": [{"family": "linear"}]},
}


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (GCS, raylet, dashboard/job server) on 127.0.0.1, shut down through its own API.

    Its files go to a private, short temp dir (socket paths must stay under 108 characters), so no other
    process's `ray.init()` can find and join it.
    """
    from ray.cluster_utils import Cluster

    from sweeps.mlflow_server import free_port

    with private_ray_tmpdir() as temp_dir:
        port = free_port()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "temp_dir": temp_dir,
        })
        try:
            yield cluster, f"http://127.0.0.1:{port}"
        finally:
            cluster.shutdown()


def finished(uri: str, sweep: str) -> int:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[sweep], filter_string="tags.`iclmix.role` = 'trial'")
    return int((runs.status == "FINISHED").sum())


def test_sweep_joins_a_running_cluster(tmp_path, ray_head, mlflow_server):
    cluster, _ = ray_head
    sweep = tmp_path / "joined.yaml"
    sweep.write_text(yaml.safe_dump({"name": "joined", "base": BASE, "seeds": [0, 1]}))
    r = run_cli("sweep", "run", sweep, "--address", cluster.address, "--tracking-uri", mlflow_server.uri,
                "--storage", tmp_path / "store", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert finished(mlflow_server.uri, "joined") == 2
    runs = mlflow.search_runs(experiment_names=["joined"], filter_string="tags.`iclmix.role` = 'trial'")
    assert set(runs["tags.iclmix.ray_node"]) == {cluster.head_node.node_id}  # ran on the cluster, not a local Ray


def test_sweep_submitted_with_ray_job_submit(tmp_path, ray_head, mlflow_server):
    _, dashboard = ray_head
    sweep = tmp_path / "submitted.yaml"
    sweep.write_text(yaml.safe_dump({"name": "submitted", "base": BASE, "seeds": [0]}))
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    entry = (f"{sys.executable} -m iclmix sweep run {sweep} --address auto "
             f"--tracking-uri {mlflow_server.uri} --storage {tmp_path / 'store'}")
    t0 = time.monotonic()
    r = subprocess.run([ray, "job", "submit", "--address", dashboard, "--", *entry.split()],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout, r.stdout[-2000:]
    assert finished(mlflow_server.uri, "submitted") == 1, time.monotonic() - t0
