"""Where a sweep's results live, defined once for the runner that writes them and the analysis that reads them:
the storage folder, the MLflow database in it, and every `iclmix.*` tag. Imports nothing heavy (no MLflow, no Ray).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORAGE = "runs"  # relative to the working directory; `--storage` or $ICLMIX_STORAGE moves it
MLFLOW_DB = "mlflow.db"  # the local default tracking store, inside the sweep's folder

# tags of every run: which sweep, which role (parent | cell | trial)
TAG_SWEEP = "iclmix.sweep"
TAG_ROLE = "iclmix.role"
# what a trial is and where it came from
TAG_CELL = "iclmix.cell"
TAG_CELL_LABEL = "iclmix.cell_label"
TAG_SEED = "iclmix.seed"
TAG_HASH = "iclmix.config_hash"
TAG_COMMIT = "iclmix.git_commit"
TAG_SEARCH = "iclmix.search"
TAG_BEST_PARAMS = "iclmix.best_params"  # on an Optuna cell run
# how it went
TAG_ERROR = "iclmix.error"
TAG_TRACEBACK = "iclmix.traceback"
TAG_FIGURE_ERROR = "iclmix.figure_error"
TAG_RESUMED_FROM = "iclmix.resumed_from"  # fresh | store | ray
# where it ran
TAG_NODE = "iclmix.node"
TAG_RAY_NODE = "iclmix.ray_node"
TAG_DEVICE = "iclmix.device"
TAG_GPU_IDS = "iclmix.gpu_ids"
TAG_GPU_NAME = "iclmix.gpu_name"
TAG_GPU_FRACTION = "iclmix.gpu_memory_fraction"
TAG_GPU_CAP_GIB = "iclmix.gpu_memory_cap_gib"

FIGURES_ARTIFACTS = "figures"  # a trial's ICL-curve figure
ANALYSIS_ARTIFACTS = "analysis"  # what `iclmix analyze` logs to the parent run


def is_uri(path: str) -> bool:
    return "://" in path


def sweep_root(sweep: str, storage: str | None = None) -> str:
    """The sweep's folder: under `storage`, else $ICLMIX_STORAGE, else ./runs (an absolute path, or a URI)."""
    base = storage or os.environ.get("ICLMIX_STORAGE") or DEFAULT_STORAGE
    if is_uri(base):
        return f"{base.rstrip('/')}/{sweep}"
    return str((Path(base) / sweep).resolve())
