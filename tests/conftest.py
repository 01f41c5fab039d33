"""Shared test helpers: run the real `iclmix` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
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
