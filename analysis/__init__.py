"""Analysis of sweeps read back from MLflow: tidy frames, coverage maps, ICL curves, figures and a report.

Submodules import lazily (no Ray, and no MLflow or matplotlib until used)::

    from analysis import load_sweep, coverage_map
    frame = load_sweep("quickstart", "sqlite:////abs/runs/quickstart/mlflow.db")
    m = coverage_map(frame, "weight:sparse_linear(nnz=1)", "nnz", k="all", relative_to="bayes_task")
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_sweep": "load",
    "trials_table": "load",
    "sweep_file": "load",
    "default_tracking_uri": "load",
    "log_to_parent": "load",
    "coverage_map": "maps",
    "CoverageMap": "maps",
    "icl_curves": "maps",
    "model_selection": "maps",
    "default_axes": "maps",
    "trial_values": "maps",
    "seed_interval": "maps",
    "coverage_descriptors": "coverage",
    "in_support": "coverage",
    "task_axes": "coverage",
    "parse_family_id": "coverage",
    "plot_heatmap": "figures",
    "plot_curves": "figures",
    "plot_model_selection": "figures",
    "write_report": "report",
    "write_frame": "load",
    "read_frame": "load",
    "run_check": "checks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
