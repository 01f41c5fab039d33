"""MLflow tracking done by the trials themselves (not Ray's MLflowLoggerCallback, which duplicates runs).

Experiment = sweep name; one parent run per sweep; one child run per trial tagged with its config
hash, so a retried or resumed trial re-attaches to its own run instead of creating another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from icl_core.config import ConfigError
from icl_core.families import build_mixture

from .layout import TAG_HASH, TAG_ROLE, TAG_SWEEP

MAX_PARAM_LEN = 6000
BATCH = 900  # log_batch takes at most 1000 metrics per request


_KEY_MAP = str.maketrans({"(": ".", ")": "", "=": ":", ",": " ", "*": "x", "+": " "})


def check_reachable(tracking_uri: str, timeout: float = 10.0) -> None:
    """Fail fast on a tracking server that is down (MLflow's own client retries for minutes)."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answers (a proxy or an auth layer may refuse /health): let MLflow talk to it
    except (OSError, ValueError) as e:
        raise ConfigError("--tracking-uri", f"cannot reach the MLflow server at {tracking_uri}: {e}") from None


def mlflow_key(name: str) -> str:
    """MLflow names allow only alphanumerics and _-. :/ ; `sparse_linear(nnz=1)` -> `sparse_linear.nnz:1`."""
    key = name.translate(_KEY_MAP)
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)[:250]


def git_commit(path: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted params from a resolved config; a mixture becomes its canonical id plus one weight per family."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if key == "mixture" and isinstance(value, list):
            mix = build_mixture(value)
            out[name] = mix.canonical_id
            for fam, w in mix.items():
                out[f"{name}.weight.{fam.canonical_id}"] = repr(w)
        elif isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return {mlflow_key(k): v[:MAX_PARAM_LEN] for k, v in out.items()}


# MLflow 3 opens an experiment of unknown kind on its GenAI pages (traces); a sweep is model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def source_tags(commit: str, source: str) -> dict[str, str]:
    """MLflow's own tags for who ran what, from which commit (its UI's Source, User and commit columns)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_GIT_COMMIT: commit, MLFLOW_USER: user}


def tracking_uri_from_env(tracking_uri: str | None) -> str | None:
    """`--tracking-uri`, else MLflow's own MLFLOW_TRACKING_URI, else None (the sweep's local sqlite file)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def search_all(client: MlflowClient, exp_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_runs(client: MlflowClient, exp_id: str, sweep: str, role: str, **tags: str) -> list:
    filt = f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = '{role}'"
    for key, value in tags.items():
        filt += f" and tags.`iclmix.{key}` = '{value}'"
    return search_all(client, exp_id, filt)


def finished_hashes(client: MlflowClient, exp_id: str, sweep: str) -> set[str]:
    """Config hashes of trials already FINISHED in MLflow: those are never trained again."""
    return {
        r.data.tags[TAG_HASH]
        for r in find_runs(client, exp_id, sweep, "trial")
        if r.info.status == "FINISHED" and TAG_HASH in r.data.tags
    }


def ensure_run(
    client: MlflowClient,
    exp_id: str,
    *,
    sweep: str,
    role: str,
    name: str,
    tags: Mapping[str, str],
    parent_id: str | None = None,
    match: Mapping[str, str] | None = None,
) -> str:
    """The run with these identifying tags (re-opened as RUNNING), or a new one."""
    existing = find_runs(client, exp_id, sweep, role, **dict(match or {}))
    if existing:
        run = sorted(existing, key=lambda r: r.info.start_time)[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    all_tags = {TAG_SWEEP: sweep, TAG_ROLE: role, MLFLOW_RUN_NAME: name, **tags}
    if parent_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
    run = client.create_run(exp_id, tags=all_tags, run_name=name)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params once (a resumed run already has them; MLflow rejects changing a logged param)."""
    have = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Iterable[Metric]) -> None:
    batch = [Metric(mlflow_key(m.key), m.value, m.timestamp, m.step) for m in metrics]
    for i in range(0, len(batch), BATCH):
        client.log_batch(run_id, metrics=batch[i : i + BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


class MetricBuffer:
    """A TrainCallback that batches training metrics and sends them at each checkpoint (one request)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: list[Metric] = []

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.pending.extend(Metric(f"train/{k}", float(v), now, step) for k, v in metrics.items())

    def on_checkpoint(self, step: int, path: Path, metrics: Mapping[str, float]) -> None:
        self.flush()

    def flush(self) -> None:
        if self.pending:
            log_metrics(self.client, self.run_id, self.pending)
            self.pending = []
