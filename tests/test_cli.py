"""CLI manners: `--help` answers without importing torch, Ray, MLflow or pandas; `--version` says what is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, run_cli

HEAVY = ("torch", "ray", "mlflow", "pandas", "matplotlib", "optuna")


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["sweep", "run", "--help"], ["analyze", "--help"],
                                  ["analyze", "heatmap", "--help"], ["train", "--help"], ["--version"]])
def test_help_imports_nothing_heavy(argv):
    probe = (f"import sys\nfrom iclmix.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
             f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "LOADED []", r.stdout[-500:]


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("iclmix 0."), (r.stdout, r.stderr)
