"""Shared test helpers: run the real `iclmix` CLI in a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "example.yaml"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# One torch thread in the test process (subprocesses get OMP_NUM_THREADS=1): with 2 threads on a busy
# 2-core machine OpenMP can stall for minutes, and the suite's own subprocesses keep the machine busy.
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def tiny_config(eval_section: dict | None = None, **train_kw) -> dict:
    """A run config small enough to train in seconds: d = 5, a 50/50 dense/sparse mixture, 2 x 32 x 2 heads."""
    cfg = {
        "seed": 3,
        "data": {"dim": 5, "n_points": 11, "mixture": [{"family": "linear", "weight": 0.5},
                                                       {"family": "sparse_linear", "nnz": 1, "weight": 0.5}]},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
        "train": {"steps": 300, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 50, **train_kw},
    }
    return {**cfg, "eval": eval_section} if eval_section is not None else cfg


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m iclmix ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "iclmix", *map(str, args)],
        cwd=cwd or ROOT, env={**cli_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


@contextlib.contextmanager
def private_ray_tmpdir() -> Iterator[str]:
    """A short private RAY_TMPDIR (socket paths must stay under 108 characters) so that no other process's
    `ray.init()` finds the clusters a test starts; yields the `temp_dir` to give the head node."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    os.makedirs(f"{tmp}/ray")  # Ray keeps its files (and ray_current_cluster) in $RAY_TMPDIR/ray
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    try:
        yield f"{tmp}/ray"
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite + proxied artifacts), stopped by PID at the end."""
    from sweeps.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), fate_share=False).start(timeout=180)
    yield server
    server.stop()


@pytest.fixture
def example_config() -> Path:
    return EXAMPLE
