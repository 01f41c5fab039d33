"""The Ray Tune function trainable: train one resolved config (or a bundle of them), evaluate, track in MLflow.

A trial resumes from Ray's checkpoint when Ray retries it, else from the sweep's checkpoint store keyed
by config hash (so a new `sweep run` after the driver died continues it), else starts fresh.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray import tune

from icl_core.bundle import train_bundle
from icl_core.config import ConfigError, RunConfig, dump_yaml
from icl_core.evaluate import EVAL_CSV, evaluate_run, summarize, write_eval_csv
from icl_core.train import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    NonFiniteLossError,
    TrainResult,
    load_checkpoint,
    resolve_device,
    train,
)

from . import layout
from . import tracking as tr

STORE_FILES = (CHECKPOINT, METRICS)


class CheckpointStore:
    """Checkpoints keyed by config hash under the sweep's storage (a local path or a pyarrow URI)."""

    def __init__(self, root: str):
        self.fs, self.root = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)

    def _dir(self, key: str) -> str:
        return f"{self.root}/checkpoints/{key}"

    def has(self, key: str) -> bool:
        return self.fs.get_file_info(f"{self._dir(key)}/{CHECKPOINT}").type == pafs.FileType.File

    def get(self, key: str, dest: Path) -> bool:
        if not self.has(key):
            return False
        for name in STORE_FILES:
            src = f"{self._dir(key)}/{name}"
            if self.fs.get_file_info(src).type == pafs.FileType.File:
                pafs.copy_files(src, str(dest / name), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
        return True

    def put(self, key: str, src: Path) -> None:
        self.fs.create_dir(self._dir(key), recursive=True)
        for name in (METRICS, CHECKPOINT):  # checkpoint last: its presence means the pair is complete
            tmp = f"{self._dir(key)}/.{name}.tmp"
            pafs.copy_files(str(src / name), tmp, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            self.fs.move(tmp, f"{self._dir(key)}/{name}")


class StoreCheckpoint:
    """TrainCallback: copy each checkpoint (with the metrics up to it) into the store under the run's hash."""

    def __init__(self, store: CheckpointStore, key: str):
        self.store, self.key = store, key

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.store.put(self.key, path.parent)


class RayReporter:
    """Report a checkpoint step to Ray Tune, once for the trial's runs (one folder per run hash), so Ray's retry
    of the trial has them. As a TrainCallback it reports the one run it follows."""

    def __init__(self, works: dict[str, Path], total_steps: int):
        self.works, self.total = works, total_steps

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.report(step, metrics)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory(prefix="iclmix-ckpt-") as d:
            for key, work in self.works.items():
                if (work / CHECKPOINT).exists():
                    (Path(d) / key).mkdir()
                    for name in STORE_FILES:
                        shutil.copy2(work / name, Path(d) / key / name)
            tune.report(
                {"step": step, "progress": step / self.total, **{f"train/{k}": v for k, v in metrics.items()}},
                checkpoint=tune.Checkpoint.from_directory(d),
            )


class FaultOnce:
    """Resilience tests: ICLMIX_FAULT_ONCE=DIR:STEP makes each trial raise once, right after checkpoint STEP."""

    def __init__(self, spec: str, key: str):
        folder, step = spec.rsplit(":", 1)
        self.marker, self.step = Path(folder) / key, int(step)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        if step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
            raise RuntimeError(f"injected fault at step {step}")


def _restore(work: Path, store: CheckpointStore, key: str) -> str:
    """The run's newest checkpoint into `work`, from Ray's retry or the store (in a bundle the store can be a
    checkpoint ahead of Ray's last report); says which, or "fresh"."""
    from_store = store.get(key, work)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            src = Path(d) / key
            if (src / CHECKPOINT).exists() and (not from_store or _step(src) >= _step(work, default=-1)):
                for name in STORE_FILES:
                    if (src / name).exists():
                        shutil.copy2(src / name, work / name)
                return "ray"
    return "store" if from_store else "fresh"


def _step(folder: Path, default: int | None = None) -> int:
    """The step of a folder's checkpoint; `default` where it cannot be read (if given)."""
    try:
        return load_checkpoint(folder / CHECKPOINT)["step"]
    except ConfigError:
        if default is None:
            raise
        return default


def _backfill_metrics(client: MlflowClient, run_id: str, metrics_csv: Path, upto: int) -> None:
    """After a resume from the checkpoint of step `upto`, send the logged rows up to it that MLflow has not seen
    (it may have missed the last flush). Later rows are trained again, so they are logged then, once."""
    if not metrics_csv.exists():
        return
    seen = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    now = int(time.time() * 1000)
    batch = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            if step <= upto and step not in seen:
                batch.extend(Metric(f"train/{k}", float(row[k]), now, step) for k in ("loss", "lr"))
    tr.log_metrics(client, run_id, batch)


def trial_params(cfg: RunConfig, families: Iterable[str]) -> dict[str, str]:
    """The resolved config as MLflow params, with a weight for every family of the sweep (0 where absent), so
    the runs table can sort and filter by any family's weight."""
    params = tr.flatten_config(cfg.to_dict())
    for fam in families:
        params.setdefault(tr.mlflow_key(f"data.mixture.weight.{fam}"), "0.0")
    return params


def _log_curve_figure(client: MlflowClient, run_id: str, rows, cfg, title: str, work: Path) -> None:
    """The trial's own ICL curves (error vs k per eval task, the model against every baseline) as an artifact."""
    import pandas as pd

    from analysis.figures import plot_curves

    curves = pd.DataFrame([{"task": r.task, "estimator": r.estimator, "k": r.k, "mean": r.error,
                            "ci_low": r.ci_low, "ci_high": r.ci_high} for r in rows])
    inside = {c.canonical_id for c in cfg.data.family.components}
    try:
        paths = plot_curves(curves, work / "figures", "icl_curves", title, {t: t in inside for t in curves["task"]},
                            cfg.data.dim)
    except Exception as e:  # the trial's results are logged already; say why its figure is missing
        tr.set_tags(client, run_id, {layout.TAG_FIGURE_ERROR: f"{type(e).__name__}: {e}"[:4000]})
        return
    for path in paths:
        if path.suffix == ".png":
            client.log_artifact(run_id, str(path), layout.FIGURES_ARTIFACTS)


def claim_device(gpus: float, wanted: str) -> tuple[torch.device, dict[str, str]]:
    """The device this trial trains on, with its GPU memory capped to the trial's fraction, and tags saying so.

    Ray's fractional GPUs are bookkeeping only: without the cap, trials packed on one GPU could take all of it.
    """
    device = resolve_device(wanted)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the memory calls need an index
    tags = {layout.TAG_DEVICE: str(device)}
    if device.type == "cuda":
        fraction = min(1.0, gpus) if gpus > 0 else 1.0
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.reset_peak_memory_stats(device)  # a reused trial actor keeps the previous trial's peak
        props = torch.cuda.get_device_properties(device)
        tags.update({layout.TAG_GPU_NAME: props.name, layout.TAG_GPU_FRACTION: f"{fraction:g}",
                     layout.TAG_GPU_CAP_GIB: f"{fraction * props.total_memory / 2**30:.2f}"})
    return device, tags


@dataclass(frozen=True)
class TrialPayload:
    """What the driver hands a trial: its validated config, who it is in the sweep, and where it reports."""

    config: RunConfig
    hash: str
    name: str  # Ray's trial folder: short and plain
    run_name: str  # MLflow's: what the trial is
    families: tuple[str, ...]  # every family of the sweep's mixtures (a weight param for each)
    cell: str
    cell_label: str
    seed: int
    search: str  # the Optuna parameters as JSON ("{}" in a grid)
    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str
    store: str
    cpus: float
    gpus: float


def run_trial(config: dict[str, Any], bundles: Sequence[tuple[TrialPayload, ...]]) -> None:
    """Ray Tune entry point: `config["trial"]` indexes the bundles the driver built for this round. A bundle of one
    trains alone (with its config's step options), a larger one as one bundled model (icl_core.bundle)."""
    first = bundles[config["trial"]][0]
    client = MlflowClient(first.tracking_uri)
    # A retried bundle leaves alone the members an earlier attempt finished (evaluated and logged once).
    done = tr.finished_hashes(client, first.experiment_id, first.sweep)
    members = tuple(t for t in bundles[config["trial"]] if t.hash not in done)
    if not members:
        tune.report({"step": first.config.train.steps, "progress": 1.0, "iclmix_failed": 0,
                     "iclmix_failed_members": "{}"})
        return
    first = members[0]
    torch.set_num_threads(max(1, int(first.cpus)))
    device, device_tags = claim_device(first.gpus, first.config.train.device)
    store = CheckpointStore(first.store)
    works = {t.hash: Path(tempfile.mkdtemp(prefix=f"iclmix-{t.hash}-")) for t in members}
    run_ids: dict[str, str] = {}  # hash -> MLflow run of each member started here
    ended: set[str] = set()  # members whose MLflow run this trial ended
    try:
        for t in members:
            _start_member(t, client, store, works[t.hash], device_tags, run_ids)
        if len(members) == 1:
            results = {first.hash: _train_alone(first, works[first.hash], store, client, run_ids[first.hash])}
        else:  # members resumed at different steps train together once the ones behind catch up
            results = _train_bundled(members, works, store, client, run_ids)
        failed, summaries = {}, []
        for t in members:
            result = results[t.hash]
            if isinstance(result, NonFiniteLossError):  # deterministic: a retry would fail the same way
                tr.set_tags(client, run_ids[t.hash], {layout.TAG_ERROR: str(result)})
                tr.end_run(client, run_ids[t.hash], "FAILED")
                failed[t.hash] = str(result)
            else:
                summaries.append(_finish_member(t, result, client, run_ids[t.hash], works[t.hash], device))
            ended.add(t.hash)
    except Exception as e:
        for key in run_ids.keys() - ended:
            tr.set_tags(client, run_ids[key], {layout.TAG_ERROR: f"{type(e).__name__}: {e}"[:4000],
                                               layout.TAG_TRACEBACK: traceback.format_exc()[-4000:]})
            tr.end_run(client, run_ids[key], "FAILED")
        raise
    finally:
        for work in works.values():
            shutil.rmtree(work, ignore_errors=True)
    report = {"step": first.config.train.steps, "progress": 1.0, "members": len(members),
              "iclmix_failed": int(len(failed) == len(members)), "iclmix_failed_members": json.dumps(failed)}
    if failed:
        report["error"] = "; ".join(failed.values())
    if len(summaries) == 1:
        report.update(summaries[0])
    elif losses := [s["eval_loss"] for s in summaries if math.isfinite(s.get("eval_loss", math.nan))]:
        report["eval_loss"] = min(losses)  # the progress line's best
    tune.report(report)


def _start_member(t: TrialPayload, client: MlflowClient, store: CheckpointStore, work: Path,
                  device_tags: dict[str, str], run_ids: dict[str, str]) -> None:
    """Restore the member's checkpoint, open (or reopen) its MLflow run with tags, params and config."""
    source = _restore(work, store, t.hash)
    resumed_step, run_id = 0, None
    if (work / CHECKPOINT).exists():
        ckpt = load_checkpoint(work / CHECKPOINT)
        run_id, resumed_step = ckpt.get("extra", {}).get("mlflow_run_id"), ckpt["step"]
        del ckpt
    if run_id is None:
        run_id = tr.ensure_run(
            client, t.experiment_id, sweep=t.sweep, role="trial", name=t.run_name,
            parent_id=t.parent_run_id, match={"config_hash": t.hash},
            tags={layout.TAG_CELL: t.cell, layout.TAG_CELL_LABEL: t.cell_label, layout.TAG_SEED: str(t.seed),
                  layout.TAG_HASH: t.hash, layout.TAG_COMMIT: t.git_commit, layout.TAG_SEARCH: t.search,
                  **tr.source_tags(t.git_commit, f"iclmix sweep run {t.sweep}")},
        )
    else:
        client.update_run(run_id, status="RUNNING")
    run_ids[t.hash] = run_id
    ctx = ray.get_runtime_context()
    tr.set_tags(client, run_id, {layout.TAG_RESUMED_FROM: source, layout.TAG_NODE: os.uname().nodename,
                                 layout.TAG_RAY_NODE: ctx.get_node_id(),
                                 layout.TAG_GPU_IDS: ",".join(map(str, ray.get_gpu_ids())), **device_tags})
    tr.log_params(client, run_id, trial_params(t.config, t.families))
    (work / CONFIG).write_text(dump_yaml(t.config))  # first: a trial that fails still says what it was
    client.log_artifact(run_id, str(work / CONFIG))
    if source != "fresh":
        _backfill_metrics(client, run_id, work / METRICS, resumed_step)


def _member_callbacks(t: TrialPayload, store: CheckpointStore, buffer: tr.MetricBuffer,
                      reporter: RayReporter | None = None) -> list:
    """Store each checkpoint by hash (and report it to Ray), then flush the metrics up to it: a trial killed in
    between resumes from that checkpoint and backfills them, never re-running (and re-logging) steps MLflow has."""
    callbacks = [StoreCheckpoint(store, t.hash), *([reporter] if reporter else []), buffer]
    if os.environ.get("ICLMIX_FAULT_ONCE"):
        callbacks.append(FaultOnce(os.environ["ICLMIX_FAULT_ONCE"], t.hash))
    return callbacks


def _train_alone(t: TrialPayload, work: Path, store: CheckpointStore, client: MlflowClient,
                 run_id: str) -> TrainResult | NonFiniteLossError:
    buffer = tr.MetricBuffer(client, run_id)
    reporter = RayReporter({t.hash: work}, t.config.train.steps)
    try:
        result = train(t.config, work, resume=True, progress=False, extra={"mlflow_run_id": run_id},
                       callbacks=_member_callbacks(t, store, buffer, reporter))
    except NonFiniteLossError as e:
        return e
    buffer.flush()
    return result


def _train_bundled(group: Sequence[TrialPayload], works: dict[str, Path], store: CheckpointStore,
                   client: MlflowClient, run_ids: dict[str, str]) -> dict[str, TrainResult | NonFiniteLossError]:
    buffers = [tr.MetricBuffer(client, run_ids[t.hash]) for t in group]
    reporter = RayReporter({t.hash: works[t.hash] for t in group}, group[0].config.train.steps)
    results = train_bundle(
        [t.config for t in group], [works[t.hash] for t in group], resume=True, progress=False,
        extras=[{"mlflow_run_id": run_ids[t.hash]} for t in group],
        callbacks=[_member_callbacks(t, store, b) for t, b in zip(group, buffers, strict=True)],
        on_checkpoint=reporter.report,
    )
    for b, r in zip(buffers, results, strict=True):
        if not isinstance(r, NonFiniteLossError):  # a frozen member's rows past its checkpoint are trained again
            b.flush()
    return {t.hash: r for t, r in zip(group, results, strict=True)}


def _finish_member(t: TrialPayload, result: TrainResult, client: MlflowClient, run_id: str, work: Path,
                   device: torch.device) -> dict[str, float]:
    """Evaluate the trained member, log its summary, artifacts and figure, and end its run FINISHED."""
    rows = evaluate_run(result.model, t.config, device=device)
    write_eval_csv(rows, work / EVAL_CSV)
    summary = summarize(rows)
    if device.type == "cuda":  # what the trial took of its GPU, to set against iclmix.gpu_memory_cap_gib
        summary["gpu/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    now = int(time.time() * 1000)
    tr.log_metrics(client, run_id, [Metric(k, v, now, 0) for k, v in summary.items()])  # one value, no steps
    for name in (EVAL_CSV, METRICS, CHECKPOINT):
        client.log_artifact(run_id, str(work / name))
    _log_curve_figure(client, run_id, rows, t.config, t.run_name, work)
    tr.end_run(client, run_id, "FINISHED")
    return summary
