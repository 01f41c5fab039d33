"""Autoscaling without a cloud: Ray's `fake_multinode` provider (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config …`) starts a CPU-only head; a sweep of GPU trials makes the autoscaler launch a GPU worker
node (a real raylet on this host), the trials run there, and the node is released once idle."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import yaml
from conftest import cli_env, private_ray_tmpdir, run_cli

pytestmark = pytest.mark.slow

IDLE_S = 15  # idle_timeout_minutes = 0.25: idle GPU nodes go back quickly (cluster.yaml uses a few minutes)


def _ray() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def gpu_workers(address: str) -> int | None:
    """`gpu_worker` nodes up, according to `ray status` (None when it cannot tell)."""
    r = subprocess.run([_ray(), "status", "--address", address], env=cli_env(), capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0 or "Node status" not in r.stdout:
        return None
    up = r.stdout.split("Node status", 1)[1].split("Pending:", 1)[0]  # Active: / Idle: (Healthy: before 2.10)
    return sum(int(n) for n in re.findall(r"^\s*(\d+)\s+gpu_worker\s*$", up, flags=re.M))


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """A head started with the fake_multinode autoscaler: 1 CPU, no GPU; one GPU worker type, 0..1 nodes."""
    from ray._private.services import get_node_ip_address

    from sweeps.mlflow_server import free_port

    # `ray start --head` turns token authentication on; the head, its fake nodes, `ray status` and the sweep's
    # driver must agree, and a throwaway cluster on this host needs no token.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with private_ray_tmpdir() as temp_dir:
        ip, port = get_node_ip_address(), free_port()
        config = tmp_path / "fake-cluster.yaml"
        config.write_text(yaml.safe_dump({
            "cluster_name": "iclmix-fake",
            "max_workers": 1,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": IDLE_S / 60,
            "provider": {"type": "fake_multinode", "gcs_address": f"{ip}:{port}", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0,
                               "max_workers": 1},
            },
            # the launcher's keys, empty: nothing to sync or run on a node that is a process on this host
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }))
        env = {**cli_env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        head = subprocess.Popen([_ray(), "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                                 f"--temp-dir={temp_dir}", "--include-dashboard=false",
                                 f"--autoscaling-config={config}", "--block"],
                                env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        address = f"{ip}:{port}"
        try:
            deadline = time.monotonic() + 120
            while gpu_workers(address) is None:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the head did not come up"
                time.sleep(1)
            yield address
        finally:
            procs = [head, *_descendants(head.pid)]
            for p in procs:
                _signal(p, signal.SIGTERM)
            gone, alive = psutil.wait_procs([psutil.Process(p.pid) for p in procs if _exists(p.pid)], timeout=30)
            for p in alive:
                p.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _exists(pid: int) -> bool:
    return psutil.pid_exists(pid)


def _signal(p, sig) -> None:
    try:
        p.send_signal(sig)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass


def test_gpu_sweep_brings_up_a_gpu_node_that_is_released_when_idle(tmp_path, fake_cluster, mlflow_server):
    address = fake_cluster
    assert gpu_workers(address) == 0  # nothing but the CPU head
    sweep = tmp_path / "scaled.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "scaled",
        "base": {"data": {"dim": 3, "n_points": 6}, "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
                 "train": {"steps": 60, "batch_size": 8, "checkpoint_every": 30, "log_every": 10},
                 "eval": {"n_prompts": 16, "estimators": ["model", "ols"], "tasks": [{"family": "linear"}]}},
        "seeds": [0, 1],
        "resources": {"cpu": 1, "gpu": 0.5},
    }))
    r = run_cli("sweep", "run", sweep, "--address", address, "--tracking-uri", mlflow_server.uri,
                "--storage", tmp_path / "store", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server.uri)
    runs = mlflow.search_runs(experiment_names=["scaled"], filter_string="tags.`iclmix.role` = 'trial'")
    assert len(runs) == 2 and (runs.status == "FINISHED").all()
    # The fake provider names the nodes it launches ffff…0000N; the head has a random id.
    assert runs["tags.iclmix.ray_node"].str.fullmatch(r"f{51}\d{5}").all(), runs["tags.iclmix.ray_node"]
    assert (runs["tags.iclmix.gpu_ids"] != "").all()
    # Idle now: the autoscaler gives the GPU node back after idle_timeout_minutes.
    deadline = time.monotonic() + IDLE_S + 120
    while gpu_workers(address) != 0:
        assert time.monotonic() < deadline, "the idle GPU node was not released"
        time.sleep(2)


def test_trial_no_node_type_can_fit_is_an_error_within_the_fit_timeout(tmp_path, fake_cluster, mlflow_server):
    # 64 CPUs per trial: neither the head (1 CPU) nor the GPU worker type (2 CPUs) can take it.
    sweep = tmp_path / "huge.yaml"
    sweep.write_text(yaml.safe_dump({"name": "huge", "resources": {"cpu": 64}, "base": {
        "data": {"dim": 3, "n_points": 6}, "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
        "train": {"steps": 20, "batch_size": 8, "checkpoint_every": 20}}}))
    start = time.monotonic()
    r = run_cli("sweep", "run", sweep, "--address", fake_cluster, "--tracking-uri", mlflow_server.uri,
                "--storage", tmp_path / "store", timeout=300, env={"ICLMIX_FIT_TIMEOUT_S": "20"})
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "resources.cpu" in lines[0] and "within 20 s" in lines[0], lines
    assert "asking the autoscaler" in r.stdout
    assert time.monotonic() - start < 120
    mlflow.set_tracking_uri(mlflow_server.uri)
    assert mlflow.get_experiment_by_name("huge") is None  # nothing launched or tracked
