"""Load a sweep from MLflow into one tidy frame: one row per (trial, eval task, k, estimator).

Trial runs are found by tag (`iclmix.sweep`, `iclmix.role = trial`); each FINISHED trial's `eval.csv` and
`config.yaml` are read straight from disk when the artifact store is a local path (the local default),
otherwise downloaded with a thread pool into a cache keyed by run id and end time. Trials that failed or
have not finished yet keep their rows, with NaN errors, built from their logged params, so every map
shows them as missing rather than dropping them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import yaml

from icl_core.config import RunConfig, validate_run_config
from icl_core.errors import ConfigError
from icl_core.evaluate import EVAL_CSV, EVAL_FIELDS
from icl_core.train import CONFIG
from sweeps.layout import (
    ANALYSIS_ARTIFACTS,
    MLFLOW_DB,
    TAG_CELL,
    TAG_CELL_LABEL,
    TAG_COMMIT,
    TAG_ERROR,
    TAG_HASH,
    TAG_ROLE,
    TAG_SEED,
    TAG_SWEEP,
    is_uri,
    sweep_root,
)
from sweeps.tracking import check_reachable, search_all, tracking_uri_from_env  # MLflow + icl_core only: no Ray

from .coverage import coverage_descriptors, family_from_id, in_support, task_axes

TASK_COLUMNS = ("task_family", "nnz", "freq", "alpha", "in_support")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SKIP_PARAMS = ("data.mixture", "eval.tasks", "eval.estimators", "seed")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iclmix" / "artifacts"


def default_tracking_uri(sweep: str, storage: str | None = None) -> str:
    """`sqlite:///ABS/runs/SWEEP/mlflow.db` (the local default of `iclmix sweep run`) when that file exists."""
    root = sweep_root(sweep, storage)
    if not is_uri(root):
        db = Path(root) / MLFLOW_DB
        if db.is_file():
            return f"sqlite:///{db}"
        raise ConfigError("--tracking-uri", f"not given, and the local default {db} does not exist (unknown sweep "
                          f"{sweep!r}? pass --tracking-uri)")
    raise ConfigError("--tracking-uri", f"required when the sweep storage is a URI ({root.rsplit('/', 1)[0]})")


_checked: set[str] = set()


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if tracking_uri.startswith(("http://", "https://")) and tracking_uri not in _checked:
        check_reachable(tracking_uri)
        _checked.add(tracking_uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)



def find_experiment(client, sweep: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(sweep)
    except MlflowException as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("--tracking-uri", f"cannot read {tracking_uri}: {first[:300]}") from None
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        known = f" (sweeps there: {', '.join(names)})" if names else " (it holds no sweeps)"
        raise ConfigError("--sweep", f"no sweep named {sweep!r} in {tracking_uri}{known}")
    return exp.experiment_id


def sweep_runs(client, exp_id: str, sweep: str, role: str) -> list:
    return search_all(client, exp_id, f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = '{role}'")


def parent_run_id(client, exp_id: str, sweep: str) -> str | None:
    runs = sweep_runs(client, exp_id, sweep, "parent")
    return sorted(runs, key=lambda r: r.info.start_time)[0].info.run_id if runs else None


# ---------------------------------------------------------------- artifacts


def local_artifact_dir(artifact_uri: str, tracking_uri: str) -> Path | None:
    """Where a run's artifacts lie on this machine, when they do.

    Plain paths and file:// URIs are themselves; `mlflow-artifacts:/X` (a proxying server's URI) maps to
    `DB_DIR/artifacts/X` when the tracking URI is the sqlite file of a local sweep (the server that proxied
    them used `--artifacts-destination DB_DIR/artifacts`, see sweeps/mlflow_server.py).
    """
    parsed = urlparse(artifact_uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    if parsed.scheme == "mlflow-artifacts" and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        candidate = db.parent / "artifacts" / unquote(parsed.path).lstrip("/")
        return candidate if candidate.is_dir() else None
    return None


class _Unreadable(Exception):
    pass


def _fetch_files(run, names: tuple[str, ...], tracking_uri: str, cache_dir: Path | None,
                 local_direct: bool) -> dict[str, str | None]:
    """The text of the artifacts `names` of a run (None when missing)."""
    uri = run.info.artifact_uri
    local = local_artifact_dir(uri, tracking_uri) if local_direct else None
    if local is not None and local.is_dir():
        return {name: (local / name).read_text() if (local / name).is_file() else None for name in names}
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    key = f"{run.info.run_id}-{run.info.end_time or 0}"
    folder = (cache_dir or default_cache_dir()) / key
    out: dict[str, str | None] = {}
    for name in names:
        cached = folder / name
        if not cached.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=folder))
            try:
                got = Path(download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{name}", dst_path=str(tmp),
                                              tracking_uri=tracking_uri))
                os.replace(got, cached)
            except (OSError, MlflowException) as e:
                if _missing(e):  # the trial shows as missing
                    out[name] = None
                    continue
                raise _Unreadable(f"cannot read the artifacts of run {run.info.run_id} ({uri}): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                if not any(folder.iterdir()):
                    folder.rmdir()
        out[name] = cached.read_text()
    return out


def _missing(e: Exception) -> bool:
    text = str(e).lower()
    code = getattr(e, "error_code", "")
    return (isinstance(e, FileNotFoundError) or code == "RESOURCE_DOES_NOT_EXIST" or "not found" in text
            or "no such file" in text or "does not exist" in text or "404" in text)


# ---------------------------------------------------------------- configs


def _param_value(text: str) -> Any:
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _scalar_params(params: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key, raw in params.items():
        if key.startswith(_SKIP_PARAMS):
            continue
        value = _param_value(raw)
        if isinstance(value, (list, dict)):
            value = raw
        out[key] = value
    return out


def _run_config(run, text: str) -> RunConfig:
    """The trial's config as it logged it (config.yaml), validated as `iclmix train` would: one source of defaults."""
    try:
        return validate_run_config(yaml.load(text, Loader=_YAML_LOADER))
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError("--sweep", f"the config.yaml of run {run.info.run_name} ({run.info.run_id}) does not "
                          f"validate with this version of iclmix: {e}") from None


def _trial_record(run, files: dict[str, str | None], cfg: RunConfig) -> tuple[dict[str, Any], pd.DataFrame | None]:
    tags, params = run.data.tags, run.data.params
    seed = tags.get(TAG_SEED, params.get("seed"))
    rec: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "cell": tags.get(TAG_CELL, ""),
        "cell_label": tags.get(TAG_CELL_LABEL, ""),
        "seed": int(seed) if seed is not None and str(seed).lstrip("-").isdigit() else np.nan,
        "config_hash": tags.get(TAG_HASH, ""),
        "git_commit": tags.get(TAG_COMMIT, ""),
        "failure": tags.get(TAG_ERROR, ""),
        "eval_loss": run.data.metrics.get("eval_loss", np.nan),
        "start_time": run.info.start_time,
        "dim": cfg.data.dim,
        "model_size": f"{cfg.model.n_layer}x{cfg.model.n_head}x{cfg.model.n_embd}",
        **coverage_descriptors(cfg.data.family, cfg.data.dim),
        **_scalar_params(params),
    }
    ev = None
    if run.info.status == "FINISHED" and files.get(EVAL_CSV):
        from io import StringIO

        ev = pd.read_csv(StringIO(files[EVAL_CSV]))
    rec["has_eval"] = ev is not None
    return rec, ev


def _missing_rows(cfg: RunConfig) -> pd.DataFrame:
    """The rows a trial would have had, with NaN errors."""
    ks = range(cfg.eval_points)
    rows = [(t.canonical_id, k, e, np.nan, np.nan, np.nan, cfg.evaluation.n_prompts)
            for t in cfg.eval_tasks() for k in ks for e in cfg.evaluation.estimators]
    return pd.DataFrame(rows, columns=list(EVAL_FIELDS))


def load_sweep(
    name: str,
    tracking_uri: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 8,
    local_direct: bool = True,
) -> pd.DataFrame:
    """One tidy frame for sweep `name`: a row per (trial, eval task, k, estimator).

    Columns: trial identity (`run_id`, `run_name`, `status`, `cell`, `cell_label`, `seed`, `config_hash`,
    `git_commit`, `failure` = the trial's error tag, `eval_loss`, `has_eval`), coverage (`mixture`,
    `weight:<family id>` for every family of any trial's mixture, 0 when absent, `nnz_set`, `freq_band`,
    `freq_width`), the trial's scalar params (`model.n_layer`, `train.lr`, ... and `model_size`,
    `dim`), the eval task's axes (`task`, `task_family`, `nnz`, `freq`, `alpha`, `in_support`) and the
    eval row (`k`, `estimator`, `error`, `ci_low`, `ci_high`, `n_prompts`). Trials that are not FINISHED
    (or lack eval.csv) have NaN errors. `frame.attrs` holds `sweep`, `tracking_uri`, `experiment_id`
    and `parent_run_id`.

    Artifacts on a local path are read in place (`local_direct`); other stores are downloaded by
    `workers` threads into `cache_dir` (default ~/.cache/iclmix/artifacts), keyed by run id and end time.
    """
    uri = tracking_uri_from_env(tracking_uri) or default_tracking_uri(name)
    client = _client(uri)
    exp_id = find_experiment(client, name, uri)
    runs = sweep_runs(client, exp_id, name, "trial")
    if not runs:
        raise ConfigError("--sweep", f"sweep {name!r} has no trial runs in {uri} yet")
    runs.sort(key=lambda r: (r.info.start_time, r.info.run_id))  # launch order: categorical axes keep it
    cache = Path(cache_dir).expanduser() if cache_dir else None

    def fetch(run):
        names = (CONFIG, EVAL_CSV) if run.info.status == "FINISHED" else (CONFIG,)
        return _fetch_files(run, names, uri, cache, local_direct)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            files = list(pool.map(fetch, runs))
        except _Unreadable as e:
            raise ConfigError("--tracking-uri", str(e)) from None

    support: dict[tuple[str, str, int], dict[str, Any]] = {}
    parts = []
    unconfigured = []
    for run, got in zip(runs, files):
        if not got.get(CONFIG):  # it died before its first log: nothing says what it was
            unconfigured.append(run.info.run_name)
            continue
        cfg = _run_config(run, got[CONFIG])
        rec, ev = _trial_record(run, got, cfg)
        if ev is None:
            ev = _missing_rows(cfg)
        mixture, dim = cfg.data.family, cfg.data.dim
        by_id = {t.canonical_id: t for t in cfg.eval_tasks()}
        per_task = {}
        for tid in pd.unique(ev["task"]):
            key = (tid, mixture.canonical_id, dim)
            if key not in support:
                fam = by_id.get(tid) or family_from_id(tid)
                support[key] = {**task_axes(fam, dim), "in_support": in_support(fam, mixture, dim)}
            per_task[tid] = support[key]
        ev = ev.assign(**{c: ev["task"].map({t: v[c] for t, v in per_task.items()}) for c in TASK_COLUMNS})
        trial = pd.DataFrame([rec]).loc[[0] * len(ev)].reset_index(drop=True)
        parts.append(pd.concat([trial, ev.reset_index(drop=True)], axis=1))

    if unconfigured:
        warnings.warn(f"{len(unconfigured)} trial run(s) of {name!r} logged no config.yaml and are left out: "
                      f"{', '.join(unconfigured[:5])}{' …' if len(unconfigured) > 5 else ''}", stacklevel=2)
    if not parts:
        raise ConfigError("--sweep", f"no trial run of sweep {name!r} in {uri} logged its config.yaml yet")
    frame = pd.concat(parts, ignore_index=True, sort=False)
    for col in frame.columns:
        if col.startswith("weight:"):
            frame[col] = frame[col].fillna(0.0).astype(float)
    for col in ("error", "ci_low", "ci_high"):
        frame[col] = frame[col].astype(float)
    frame["k"] = frame["k"].astype(int)
    frame["in_support"] = frame["in_support"].astype(bool)
    for col in frame.columns:  # repeated text (ids, labels, params) as categories: ~10x less memory
        kind = pd.api.types.infer_dtype(frame[col], skipna=True)
        if not isinstance(frame[col].dtype, pd.CategoricalDtype) and kind in ("string", "empty"):
            frame[col] = frame[col].astype("category")
    frame.attrs.update(sweep=name, tracking_uri=uri, experiment_id=exp_id,
                       parent_run_id=parent_run_id(client, exp_id, name))
    return frame


def trials_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trial (the trial-level columns of a `load_sweep` frame)."""
    cols = ["run_name", "run_id", "status", "cell", "cell_label", "seed", "mixture", "model_size", "eval_loss",
            "has_eval", "failure"]
    cols = [c for c in cols if c in frame.columns]
    return frame.drop_duplicates("run_id")[cols].reset_index(drop=True)


def sweep_file(name: str, tracking_uri: str) -> tuple[str, str] | None:
    """(file name, text) of the sweep file logged on the sweep's parent run, or None."""
    client = _client(tracking_uri)
    exp_id = find_experiment(client, name, tracking_uri)
    parent = parent_run_id(client, exp_id, name)
    if parent is None:
        return None
    run = client.get_run(parent)
    local = local_artifact_dir(run.info.artifact_uri, tracking_uri)
    try:
        if local is not None:
            files = sorted((local / "sweep").glob("*.y*ml"))
            return (files[0].name, files[0].read_text()) if files else None
        for info in client.list_artifacts(parent, "sweep"):
            if not info.is_dir and info.path.endswith((".yaml", ".yml")):
                from mlflow.artifacts import download_artifacts

                with tempfile.TemporaryDirectory() as d:
                    path = download_artifacts(run_id=parent, artifact_path=info.path, dst_path=d,
                                              tracking_uri=tracking_uri)
                    return Path(info.path).name, Path(path).read_text()
    except Exception:  # the report says the file could not be read
        return None
    return None


def log_to_parent(frame: pd.DataFrame, paths: list[Path], artifact_path: str = ANALYSIS_ARTIFACTS) -> str | None:
    """Log files as artifacts of the sweep's parent run; returns the run id (None when there is none).

    A proxied store read through its sqlite file (no server running) is written in place, where the
    server would have put the files.
    """
    parent = frame.attrs.get("parent_run_id")
    if not parent:
        return None
    uri = frame.attrs["tracking_uri"]
    client = _client(uri)
    artifact_uri = client.get_run(parent).info.artifact_uri
    local = local_artifact_dir(artifact_uri, uri)
    if local is not None and urlparse(artifact_uri).scheme == "mlflow-artifacts":
        dest = local / artifact_path
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy2(p, dest / Path(p).name)
        return parent
    for p in paths:
        client.log_artifact(parent, str(p), artifact_path)
    return parent


def write_frame(frame: pd.DataFrame, path: str | Path) -> Path:
    """Save a `load_sweep` frame as CSV (gzip when the name ends in .gz): results without MLflow."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6g")  # 6 digits: far below the bootstrap noise
    return path


def read_frame(path: str | Path, sweep: str | None = None) -> pd.DataFrame:
    """A frame saved by `write_frame`, with the dtypes `load_sweep` gives."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--frame", f"no such file: {path}" if not path.is_dir() else f"{path} is a folder")
    try:
        frame = pd.read_csv(path, low_memory=False)
    except OSError as e:
        raise ConfigError("--frame", f"cannot read {path} ({e.strerror or e})") from None
    except (ValueError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as e:  # bad gzip, binary, cut short
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("--frame", f"{path} is not a sweep frame saved by `analyze export` ({first})") from None
    missing = {"run_id", "mixture", "task", "k", "estimator", "error"} - set(frame.columns)
    if missing:
        raise ConfigError("--frame", f"{path} is not a sweep frame (no column {', '.join(sorted(missing))})")
    for col in frame.columns:
        if col.startswith("weight:"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce").fillna(0.0)
    ks = pd.to_numeric(frame["k"], errors="coerce")
    if ks.isna().any() or not pd.to_numeric(frame["error"], errors="coerce").notna().eq(frame["error"].notna()).all():
        raise ConfigError("--frame", f"{path} is not a sweep frame (non-numeric k or error values)")
    frame["k"] = ks.astype(int)
    frame["in_support"] = frame["in_support"].astype(str).str.lower().eq("true")
    frame.attrs.update(sweep=sweep or path.name.split(".")[0], tracking_uri=None, parent_run_id=None)
    return frame
