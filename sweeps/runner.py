"""`iclmix sweep run`: validate, skip what MLflow already has FINISHED, run the rest on Ray Tune.

Resume and extend are the same command: trials are keyed by config hash, finished ones are skipped,
interrupted ones continue from their last checkpoint. With a `tune:` section each grid cell gets an
Optuna study (ask/tell, stored in sqlite so it survives the driver), run in rounds across all cells.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icl_core.config import ConfigError, check_writable_folder, memory_estimate, memory_problem

from . import layout
from . import tracking as tr
from .reaper import start_reaper, stop_reaper
from .spec import (
    SweepSpec,
    Trial,
    axis_values,
    bundle_size,
    duration_text,
    load_sweep,
    resolve,
    trial_count,
    value_label,
)

if TYPE_CHECKING:
    from .trial import TrialPayload

ROOT = Path(__file__).resolve().parents[1]
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ctrl-C stops the whole sweep (and says how to resume it), not Tune's loop with its Tuner.restore advice.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}

FIT_TIMEOUT_S = 900  # how long a cluster's autoscaler may take to bring up a node a trial fits


@dataclass
class SweepContext:
    spec: SweepSpec
    root: str  # the sweep's storage folder (local path or URI)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str
    failed: dict[str, str] = field(default_factory=dict)  # hash -> reason
    failed_cells: dict[str, str] = field(default_factory=dict)  # cell label -> why its Optuna search failed
    families: list[str] = field(default_factory=list)  # every family of the sweep's mixtures (weights logged)


def local_state_dir(spec: SweepSpec) -> Path:
    """Driver-side state (the Optuna studies) when the sweep's storage is a remote URI."""
    path = Path(layout.DEFAULT_STORAGE) / spec.name
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def run_name(trial: Trial, search: dict[str, Any] | None = None) -> str:
    """The trial's MLflow run name: what it is, e.g. `linear=0.75, sparse_linear(nnz=1)=0.25 · s0`."""
    name = f"{trial.cell.short_label} · s{trial.seed}"
    if search and "optuna_trial" in search:
        name += f" · optuna {search['optuna_trial']}"
    return name[:250]


def _payload(ctx: SweepContext, trial: Trial, parent_id: str, search: dict[str, Any] | None = None) -> TrialPayload:
    from .trial import TrialPayload

    return TrialPayload(
        config=trial.config, hash=trial.hash, name=f"{trial.cell.id}-s{trial.seed}-{trial.hash[:6]}",
        run_name=run_name(trial, search), families=tuple(ctx.families), cell=trial.cell.id,
        cell_label=trial.cell.label, seed=trial.seed, search=json.dumps(search or {}, sort_keys=True),
        sweep=ctx.spec.name, tracking_uri=ctx.tracking_uri, experiment_id=ctx.experiment_id, parent_run_id=parent_id,
        git_commit=ctx.git_commit, store=ctx.root, cpus=ctx.spec.resources.cpu, gpus=ctx.spec.resources.gpu,
    )


class Progress:
    """A live one-line summary of the sweep, printed as trials report and at most every few seconds."""

    def __init__(self, name: str, total: int, already: int, every: float = 10.0):
        self.name, self.total, self.done, self.every = name, total, already, every
        self.already = already
        self.failed = 0
        self.best: float | None = None
        self.running: dict[str, tuple[float, int]] = {}  # Ray trial id -> (fraction of its steps done, configs)
        self.start = self.last = time.monotonic()

    def line(self) -> str:
        training = sorted((p for p, _ in self.running.values() if p < 1.0), reverse=True)
        n_training = sum(n for p, n in self.running.values() if p < 1.0)
        evaluating = sum(n for _, n in self.running.values()) - n_training
        elapsed = time.monotonic() - self.start
        parts = [f"[{self.name}] finished {self.done}/{self.total}",
                 f"training {n_training}" + (f" ({' '.join(f'{p:.0%}' for p in training[:6])})" if training else ""),
                 f"evaluating {evaluating}", f"failed {self.failed}", f"{duration_text(elapsed)} elapsed"]
        eta = self.eta(elapsed)
        if eta is not None and self.done + self.failed < self.total:
            parts.append(f"ETA {duration_text(eta)}")
        if self.best is not None:
            parts.append(f"best eval_loss {self.best:.4g}")
        return " · ".join(parts)

    def eta(self, elapsed: float) -> float | None:
        """Seconds left at this run's pace: trials' worth of work done so far against what remains."""
        running = sum(p * n for p, n in self.running.values())
        done = (self.done - self.already) + self.failed + running
        left = self.total - self.done - self.failed - running
        return elapsed / done * max(left, 0.0) if done > 0.05 else None

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            print(self.line(), flush=True)


def _callback(progress: Progress, bundles: Sequence[Sequence[str]], finished: Callable[[], set[str]]):
    """Tune's events as the progress line's counts of configs: Ray trial i trains the configs `bundles[i]` (their
    hashes); `finished()` gives the hashes MLflow holds as FINISHED, for a trial that errors after some of them."""
    from ray import tune

    def size(trial) -> int:
        return len(bundles[trial.config["trial"]])

    class ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.running.setdefault(trial.trial_id, (0.0, size(trial)))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress.running[trial.trial_id] = (float(result.get("progress", 0.0)), size(trial))
            progress.emit()

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.running.pop(trial.trial_id, None)
            result = trial.last_result or {}
            failed = len(json.loads(result.get("iclmix_failed_members") or "{}"))
            progress.failed += failed
            progress.done += size(trial) - failed
            loss = result.get("eval_loss")
            if failed < size(trial) and isinstance(loss, float) and math.isfinite(loss):
                progress.best = loss if progress.best is None else min(progress.best, loss)
            progress.emit(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.running.pop(trial.trial_id, None)
            try:
                done = len(set(bundles[trial.config["trial"]]) & finished())
            except Exception:  # MLflow out of reach: the line errs on the side of failure, the exit status does not
                done = 0
            progress.done += done
            progress.failed += size(trial) - done
            progress.emit(force=True)

        def on_step_end(self, iteration, trials, **info):
            progress.emit()

    return ProgressCallback()


def group_bundles(payloads: Sequence[TrialPayload], size: int) -> list[tuple[TrialPayload, ...]]:
    """The round's Ray trials: payloads of one bundle key (icl_core.bundle) in groups of at most `size`, in order."""
    from icl_core.bundle import bundle_key

    by_key: dict[str, list[TrialPayload]] = {}
    for p in payloads:
        by_key.setdefault(bundle_key(p.config) if size > 1 else p.hash, []).append(p)
    return [tuple(ps[i:i + size]) for ps in by_key.values() for i in range(0, len(ps), size)]


def _run_round(ctx: SweepContext, payloads: list[TrialPayload], progress: Progress, round_name: str) -> None:
    from mlflow.tracking import MlflowClient
    from ray import tune

    from .trial import run_trial

    if not payloads:
        return
    spec = ctx.spec
    bundles = group_bundles(payloads, spec.resources.bundle)
    # Tune sees only each bundle's index; the typed payloads travel whole through Ray's object store.
    trainable = tune.with_resources(tune.with_parameters(run_trial, bundles=bundles),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    storage = f"{ctx.root}/ray" if layout.is_uri(ctx.root) else str(Path(ctx.root) / "ray")

    def name(t) -> str:
        members = bundles[t.config["trial"]]
        return members[0].name + (f"+{len(members) - 1}" if len(members) > 1 else "")

    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(bundles))))},
        tune_config=tune.TuneConfig(
            reuse_actors=True,  # a new trial skips the process start and the torch/mlflow imports
            trial_name_creator=name,
            trial_dirname_creator=name,
        ),
        run_config=tune.RunConfig(
            name=round_name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_callback(progress, [[t.hash for t in b] for b in bundles],
                                 lambda: tr.finished_hashes(MlflowClient(ctx.tracking_uri), ctx.experiment_id,
                                                            spec.name))],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    for result in grid:
        if not result.config or "trial" not in result.config:
            continue
        members = bundles[result.config["trial"]]
        if result.error is not None:
            for p in members:
                ctx.failed[p.hash] = f"{type(result.error).__name__}: {result.error}".splitlines()[0]
        else:
            ctx.failed.update(json.loads((result.metrics or {}).get("iclmix_failed_members") or "{}"))


def _grid_round(ctx: SweepContext, trials: list[Trial], done: set[str], progress: Progress) -> dict[str, str]:
    """Run the trials MLflow has not FINISHED; returns every trial the sweep needs: hash -> its cell's label."""
    pending = [_payload(ctx, t, ctx.parent_run_id) for t in trials if t.hash not in done]
    _run_round(ctx, pending, progress, f"{ctx.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return {t.hash: t.cell.short_label for t in trials}


def _suggest(trial, key: str, param) -> Any:
    kind, value = param.kind()
    if kind == "loguniform":
        return trial.suggest_float(key, value[0], value[1], log=True)
    if kind == "uniform":
        return trial.suggest_float(key, value[0], value[1])
    if kind == "int":
        return trial.suggest_int(key, value[0], value[1])
    return trial.suggest_categorical(key, value)


def _optuna_rounds(ctx: SweepContext, trials: list[Trial], progress: Progress) -> dict[str, str]:
    """Each cell's study asks for one sample per round; every seed of the sample is a trial. Returns every trial
    the studies hold (hash -> its cell's label); a cell whose study completed no trial goes to `ctx.failed_cells`."""
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, tune_spec = ctx.spec, ctx.spec.tune
    assert tune_spec is not None
    client = MlflowClient(ctx.tracking_uri)
    storage = f"sqlite:///{local_state_dir(spec) if layout.is_uri(ctx.root) else Path(ctx.root)}/optuna.db"
    cells = {}
    for t in trials:
        cells.setdefault(t.cell.id, t.cell)
    direction = "minimize" if tune_spec.mode == "min" else "maximize"
    studies, cell_runs = {}, {}
    for cid, cell in cells.items():
        studies[cid] = optuna.create_study(
            study_name=f"{spec.name}-{cid}", storage=storage, load_if_exists=True, direction=direction,
            sampler=optuna.samplers.TPESampler(seed=int(cid, 16) % 2**31, n_startup_trials=2),
        )
        cell_runs[cid] = tr.ensure_run(
            client, ctx.experiment_id, sweep=spec.name, role="cell", name=f"cell-{cid}",
            parent_id=ctx.parent_run_id, match={"cell": cid},
            tags={layout.TAG_CELL: cid, layout.TAG_CELL_LABEL: cell.label, layout.TAG_COMMIT: ctx.git_commit,
                  **tr.source_tags(ctx.git_commit, f"iclmix sweep run {spec.name}")},
        )

    for round_no in range(tune_spec.trials_per_cell):
        batch: list[tuple[str, Any, list[Trial]]] = []
        for cid, cell in cells.items():
            study = studies[cid]
            open_trials = [ft for ft in study.get_trials(deepcopy=False)
                           if ft.state == optuna.trial.TrialState.RUNNING]
            if open_trials:  # asked before the driver died: run exactly those params again
                ot = open_trials[0]
                handle, params = ot.number, dict(ot.params)
            elif len(study.trials) < tune_spec.trials_per_cell:
                ot = study.ask()
                params = {k: _suggest(ot, k, p) for k, p in tune_spec.params.items()}
                handle = ot.number
            else:
                continue
            seeds = [resolve(spec.base, {**dict(cell.overrides), **params, "seed": s},
                             f"grid cell [{cell.label}]") for s in spec.seeds]
            batch.append((cid, (handle, params), [Trial(c, cell, s, params) for c, s in zip(seeds, spec.seeds)]))
        if not batch:
            break
        done = tr.finished_hashes(client, ctx.experiment_id, spec.name)
        payloads = [_payload(ctx, t, cell_runs[cid], {**params, "optuna_trial": handle})
                    for cid, (handle, params), ts in batch for t in ts if t.hash not in done]
        _run_round(ctx, payloads, progress, f"{spec.name}-r{round_no}-{time.strftime('%Y%m%d-%H%M%S')}")
        for cid, (handle, _), ts in batch:
            values = []
            for t in ts:
                runs = tr.find_runs(client, ctx.experiment_id, spec.name, "trial", config_hash=t.hash)
                fin = [r for r in runs if r.info.status == "FINISHED"]
                v = fin[0].data.metrics.get(tr.mlflow_key(tune_spec.metric)) if fin else None
                if v is not None and math.isfinite(v):
                    values.append(v)
            study = studies[cid]
            if len(values) == len(ts):
                study.tell(handle, sum(values) / len(values))
            else:
                study.tell(handle, state=optuna.trial.TrialState.FAIL)
    expected = {}
    for cid, study in studies.items():
        for ot in study.get_trials(deepcopy=False):
            for s in spec.seeds:
                key = resolve(spec.base, {**dict(cells[cid].overrides), **ot.params, "seed": s},
                              f"grid cell [{cells[cid].label}]").config_hash
                expected[key] = cells[cid].short_label
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            tr.set_tags(client, cell_runs[cid], {layout.TAG_BEST_PARAMS: json.dumps(best.params, sort_keys=True)})
            client.log_metric(cell_runs[cid], tr.mlflow_key(f"best_{tune_spec.metric}"), best.value)
        else:
            why = (f"none of its {len(study.trials)} Optuna trial(s) finished every seed with a finite "
                   f"{tune_spec.metric}")
            tr.set_tags(client, cell_runs[cid], {layout.TAG_ERROR: why})
            ctx.failed_cells[cells[cid].label] = why
        tr.end_run(client, cell_runs[cid], "FINISHED" if complete else "FAILED")
    return expected


def _init_ray(address: str | None, verbose: bool = False) -> tuple[str | None, subprocess.Popen | None]:
    """Join `address` (e.g. "auto" on a cluster or under `ray job submit`), else start a private local runtime;
    returns the local runtime's temp dir and its watchdog (None, None when joining)."""
    import ray

    env = dict(QUIET_ENV)
    if os.environ.get("ICLMIX_FAULT_ONCE"):
        env["ICLMIX_FAULT_ONCE"] = os.environ["ICLMIX_FAULT_ONCE"]
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=verbose,
                     logging_level=logging.INFO if verbose else logging.WARNING)
        except ConnectionError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError("--address", f"cannot join a Ray cluster at {address}: {first}") from None
        return None, None
    import torch

    tmp = tempfile.mkdtemp(prefix="iclray-", dir="/tmp")
    reaper = start_reaper(tmp)  # a SIGKILLed driver leaves neither Ray processes nor this temp dir behind
    # The GPUs torch sees, stated rather than left to Ray's own detection (NVML), which can miss them.
    ray.init(address="local", _temp_dir=tmp, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING, num_cpus=local_cpus(),
             num_gpus=torch.cuda.device_count())
    return tmp, reaper


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a Ray address nothing answers at (joining one retries for a minute, then a traceback)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")  # else Ray's own lookup, which fails at once
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in host:
        return  # "auto" with no RAY_ADDRESS, or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError("--address", f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start it "
                          "(`ray up cluster.yaml`) or check the address") from None


def local_cpus() -> int:
    """The CPUs this process may run on: what the private local Ray runtime is given."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_local_fit(cpu: float, gpu: float, trials: list[Trial], members: int = 1) -> None:
    """The private local runtime has only this machine's CPUs, GPUs and memory: a trial asking for more would
    wait forever or die in an allocation. (A cluster may bring bigger nodes up: `--address` waits for one.)"""
    import psutil
    import torch

    if gpu == 0 and trials:  # a CPU trial holds its whole estimate in this machine's memory
        ram = psutil.virtual_memory().total
        largest = max(trials, key=lambda t: sum(memory_estimate(t.config).values()))
        problem = memory_problem(largest.config, ram, f"this machine's {ram / 2**30:.3g} GiB", members)
        if problem:
            raise ConfigError(problem[0] if members > 1 else f"grid cell [{largest.cell.label}]: {problem[0]}",
                              problem[1])

    cpus, gpus = local_cpus(), torch.cuda.device_count()
    if cpu > cpus:
        raise ConfigError("resources.cpu", f"{cpu:g} CPUs per trial, but this machine has {cpus} for the local Ray "
                          "runtime; lower resources.cpu or join a cluster with --address")
    if gpu > 0 and gpus == 0:
        raise ConfigError("resources.gpu", f"{gpu:g} GPU per trial, but this machine has no CUDA GPU for the local "
                          "Ray runtime; set resources.gpu: 0 or join a cluster with --address")
    if gpu > gpus:
        raise ConfigError("resources.gpu", f"{gpu:g} GPUs per trial, but this machine has {gpus}; lower "
                          "resources.gpu or join a cluster with --address")


def fit_timeout() -> float:
    raw = os.environ.get("ICLMIX_FIT_TIMEOUT_S", str(FIT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError("ICLMIX_FIT_TIMEOUT_S", f"must be a number of seconds >= 0, got {raw!r}")
    return value


def wait_for_a_node_that_fits(name: str, cpu: float, gpu: float, timeout: float) -> None:
    """On a cluster, a trial must fit some node: if none does yet, ask the autoscaler for one and wait at most
    `timeout` seconds; a trial that no node can take is an error, not a sweep that waits forever."""
    import ray
    from ray.autoscaler.sdk import request_resources

    bundle = {"CPU": float(cpu), **({"GPU": float(gpu)} if gpu > 0 else {})}

    def nodes() -> list[dict[str, float]]:
        return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]

    def fits() -> bool:
        return any(all(res.get(k, 0.0) >= v for k, v in bundle.items()) for res in nodes())

    if fits():
        return
    print(f"[{name}] no node of the cluster can take a trial ({cpu:g} CPU, {gpu:g} GPU) yet; asking the autoscaler "
          f"for one (up to {timeout:.0f} s, ICLMIX_FIT_TIMEOUT_S)", flush=True)
    request_resources(bundles=[bundle])
    try:
        deadline = time.monotonic() + timeout
        while not fits():
            if time.monotonic() > deadline:
                have = nodes()
                largest = max(have, key=lambda r: (r.get("CPU", 0.0), r.get("GPU", 0.0)), default={})
                field_name = "resources.cpu" if all(r.get("CPU", 0.0) < cpu for r in have) else "resources.gpu"
                raise ConfigError(field_name, f"no node of the cluster could take a trial of {cpu:g} CPU and "
                                  f"{gpu:g} GPU within {timeout:.0f} s (largest node: {largest.get('CPU', 0):g} "
                                  f"CPU, {largest.get('GPU', 0):g} GPU); lower resources.* or add a node type "
                                  "that fits to the cluster's available_node_types")
            time.sleep(2.0)
    finally:
        request_resources(bundles=[])  # the nodes trials need are Tune's demand from here on


def check_shared_storage(root: str, timeout: float = 120.0) -> None:
    """On a multi-node cluster a local storage path must be one every node mounts (checkpoints move between
    nodes when trials are retried): the driver writes a marker there and a task pinned to each alive node
    reads it back. Stops before anything launches instead of failing trial by trial."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if layout.is_uri(root):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    marker = Path(root) / f".iclmix-shared-{token}"
    marker.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def _sees(path: str, expected: str) -> bool:
        try:
            return Path(path).read_text() == expected
        except OSError:
            return False

    try:
        refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": _sees.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker),
                                                                                                       token)
                for n in nodes}
        blind = []
        for name, ref in refs.items():
            try:
                ok = ray.get(ref, timeout=timeout)
            except Exception:  # a node that cannot run the probe cannot be trusted with checkpoints either
                ok = False
            if not ok:
                blind.append(name)
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError("--storage", f"{root} is not shared by every node of the cluster ({len(blind)} of "
                          f"{len(nodes)} cannot see it: {', '.join(blind)}); pass a path all nodes mount (NFS) "
                          "or a cloud URI such as s3://BUCKET/iclmix")


def run_sweep(
    path: str | Path,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    verbose: bool = False,
) -> int:
    """Run (or resume, or extend) a sweep; returns the process exit status. `verbose` shows Ray's own logs and
    the trials' output (errors reach MLflow and the summary either way)."""
    spec, trials = load_sweep(path)  # every input error surfaces here, before anything launches
    tracking_uri = tr.tracking_uri_from_env(tracking_uri)
    root = layout.sweep_root(spec.name, storage)
    if tracking_uri is None and layout.is_uri(root):
        raise ConfigError("--tracking-uri", "required when --storage is a URI (the default is a local sqlite file)")
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not verbose:  # Tune's experiment box and TensorBoard hint (into a temp dir it deletes), Ray's notes
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = "auto"  # submitted with `ray job submit`
    # Everything a sweep needs from outside is checked here, in seconds, before Ray starts or a file is written.
    if address is None:
        check_local_fit(spec.resources.cpu, spec.resources.gpu, trials, bundle_size(spec, trials))
    else:
        fit_wait = fit_timeout()
        check_ray_address(address)
    if not layout.is_uri(root):
        check_writable_folder(Path(root), "--storage")
    if tracking_uri is not None:
        tr.check_reachable(tracking_uri)

    from mlflow.tracking import MlflowClient

    from .mlflow_server import MlflowServer

    ray_tmp, reaper, client, ctx, server = None, None, None, None, None
    try:
        _stop_on_signals()
        ray_tmp, reaper = _init_ray(address, verbose)
        _stop_on_signals()  # again: ray.init installs its own SIGTERM handler, which exits without cleaning up
        if not layout.is_uri(root):
            Path(root).mkdir(parents=True, exist_ok=True)
        if tracking_uri is None:
            server = MlflowServer(Path(root), proxy_artifacts=False).start()
            tracking_uri = server.uri
            print(f"[{spec.name}] MLflow: {server.backend_uri} (served at {server.uri} while the sweep runs)",
                  flush=True)
        if address is not None:
            wait_for_a_node_that_fits(spec.name, spec.resources.cpu, spec.resources.gpu, fit_wait)
        check_shared_storage(root)
        client = MlflowClient(tracking_uri)
        exp_id = tr.experiment_id(client, spec.name)
        commit = tr.git_commit(ROOT)
        parent = tr.ensure_run(client, exp_id, sweep=spec.name, role="parent", name=spec.name,
                               tags={layout.TAG_COMMIT: commit,
                                     **tr.source_tags(commit, f"iclmix sweep run {spec.name}")})
        client.log_text(parent, Path(path).read_text(), f"sweep/{Path(path).name}")
        tr.log_params(client, parent, sweep_params(spec, trials))
        ctx = SweepContext(spec, root, tracking_uri, exp_id, parent, commit)
        ctx.families = sorted({c.canonical_id for t in trials for c in t.config.data.family.components})
        done = tr.finished_hashes(client, exp_id, spec.name)
        total = trial_count(spec, trials)
        already = len({t.hash for t in trials} & done) if spec.tune is None else len(done)
        print(f"[{spec.name}] {total} trials, {min(already, total)} already finished in MLflow", flush=True)
        progress = Progress(spec.name, total, min(already, total))
        if spec.tune is None:
            expected = _grid_round(ctx, trials, done, progress)
        else:
            expected = _optuna_rounds(ctx, trials, progress)

        status = _summary(client, ctx, expected)
        tr.end_run(client, parent, "FINISHED" if status == 0 else "FAILED")
        if server is not None:
            browse = f"mlflow ui --backend-store-uri {server.backend_uri}, experiment {spec.name}"
        elif tracking_uri.startswith(("http://", "https://")):  # MLflow 3 opens its GenAI pages unless told
            browse = f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}?workflowType=machine_learning"
        else:
            browse = tracking_uri
        print(f"[{spec.name}] runs: {browse}; figures and report: iclmix analyze report --sweep {spec.name} "
              "--out DIR", flush=True)
        return status
    except KeyboardInterrupt:
        _shutdown_ray(ray_tmp)  # first: no trial may write to MLflow after its run is marked KILLED
        ray_tmp = None
        if client is not None and ctx is not None:
            _mark_killed(client, ctx)
        print(f"[{spec.name}] interrupted: unfinished trials are marked KILLED in MLflow; run the same command "
              "to resume (finished trials are kept, the others continue from their last checkpoint)",
              file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _shutdown_ray(ray_tmp)
        if server is not None:
            server.stop()
        stop_reaper(reaper)  # last: it stops whatever the shutdown above left, then exits


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """SIGTERM (a scheduler's stop, `kill`) ends the sweep as Ctrl-C does: runs marked KILLED, exit 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _mark_killed(client, ctx: SweepContext) -> None:
    """The parent and every trial or cell run still RUNNING were stopped by the user: say so in MLflow."""
    for role in ("trial", "cell"):
        for r in tr.find_runs(client, ctx.experiment_id, ctx.spec.name, role):
            if r.info.status in ("RUNNING", "SCHEDULED"):
                tr.end_run(client, r.info.run_id, "KILLED")
    tr.end_run(client, ctx.parent_run_id, "KILLED")


def _shutdown_ray(tmp: str | None) -> None:
    import shutil

    import ray

    if ray.is_initialized():
        ray.shutdown()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)



def sweep_params(spec: SweepSpec, trials: list[Trial]) -> dict[str, str]:
    """The parent run's params: the sweep's shape and its base config (each trial's own config is on its run)."""
    params = {"sweep.trials": str(trial_count(spec, trials)), "sweep.seeds": json.dumps(spec.seeds),
              "sweep.resources.cpu": f"{spec.resources.cpu:g}", "sweep.resources.gpu": f"{spec.resources.gpu:g}",
              "sweep.resources.bundle": str(spec.resources.bundle)}
    for key in spec.grid:
        values = axis_values(key, spec.grid[key])  # a mixture by its id; numbers and names as they are
        params[f"sweep.grid.{key}"] = json.dumps([value_label(v) if isinstance(v, list) else v for v in values])
    if spec.tune:
        params["sweep.tune"] = json.dumps({"params": list(spec.tune.params), "metric": spec.tune.metric,
                                           "trials_per_cell": spec.tune.trials_per_cell})
    params.update(tr.flatten_config(trials[0].config.to_dict(), "base.") if trials else {})
    return {tr.mlflow_key(k): v[: tr.MAX_PARAM_LEN] for k, v in params.items()}


def _log_sweep_summary(client, ctx: SweepContext, expected: dict[str, str], latest: dict[str, Any],
                       by_status: dict[str, int]) -> None:
    """On the parent run: trial counts by status and, per cell, its mean eval loss over the finished seeds."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"trials_{status.lower().replace(' ', '_')}", float(n), now, 0)
               for status, n in by_status.items()]
    per_cell: dict[str, list[float]] = {}
    for key, label in expected.items():
        run = latest.get(key)
        if run is not None and run.info.status == "FINISHED" and "eval_loss" in run.data.metrics:
            per_cell.setdefault(label, []).append(run.data.metrics["eval_loss"])
    metrics += [Metric(f"eval_loss/{label}", sum(v) / len(v), now, 0) for label, v in per_cell.items()]
    tr.log_metrics(client, ctx.parent_run_id, metrics)


def results_table(expected: dict[str, str], latest: dict[str, Any], limit: int = 40) -> str:
    """The sweep's trials at a glance: cell, seed, status and eval loss, best first (at most `limit` rows)."""
    rows = []
    for key, label in expected.items():
        run = latest.get(key)
        seed = run.data.tags.get(layout.TAG_SEED, "?") if run is not None else "?"
        loss = run.data.metrics.get("eval_loss") if run is not None and run.info.status == "FINISHED" else None
        rows.append((label, seed, run.info.status if run is not None else "NOT STARTED", loss))
    rows.sort(key=lambda r: (r[3] is None, r[3] if r[3] is not None else 0.0, r[0], r[1]))
    width = min(60, max([len("cell"), *(len(r[0]) for r in rows)]))
    lines = [f"{'cell':<{width}}  seed  {'status':<11}  eval_loss"]
    for label, seed, status, loss in rows[:limit]:
        cell = label if len(label) <= width else label[: width - 1] + "…"
        lines.append(f"{cell:<{width}}  {seed:>4}  {status:<11}  {'' if loss is None else f'{loss:.4f}'}")
    if len(rows) > limit:
        lines.append(f"… and {len(rows) - limit} more (every trial: iclmix analyze report)")
    return "\n".join(lines)


def _summary(client, ctx: SweepContext, expected: dict[str, str]) -> int:
    """Print what became of every trial the sweep needs; 0 only when each one FINISHED."""
    latest: dict[str, Any] = {}  # hash -> its FINISHED run, else its most recent one
    for r in tr.find_runs(client, ctx.experiment_id, ctx.spec.name, "trial"):
        key = r.data.tags.get(layout.TAG_HASH)
        old = latest.get(key)
        if old is None or (old.info.status != "FINISHED"
                           and (r.info.status == "FINISHED" or r.info.start_time > old.info.start_time)):
            latest[key] = r
    by_status: dict[str, int] = {}
    unfinished = []
    for key in expected:
        run = latest.get(key)
        status = run.info.status if run is not None else "NOT STARTED"
        by_status[status] = by_status.get(status, 0) + 1
        if status != "FINISHED":
            unfinished.append((key, run, status))
    name = ctx.spec.name
    print(results_table(expected, latest), flush=True)
    print(f"[{name}] done: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())), flush=True)
    _log_sweep_summary(client, ctx, expected, latest, by_status)
    for key, run, status in unfinished:
        if run is None:
            print(f"  {status} trial {key}: {ctx.failed.get(key, 'Ray never ran it')}", flush=True)
            continue
        why = run.data.tags.get(layout.TAG_ERROR) or ctx.failed.get(key) or "it did not finish"
        print(f"  {status} {run.info.run_name} ({run.data.tags.get(layout.TAG_CELL_LABEL, '')}, "
              f"seed {run.data.tags.get(layout.TAG_SEED)}): {why}", flush=True)
    for label, why in ctx.failed_cells.items():
        print(f"  FAILED Optuna search of cell [{label}]: {why}", flush=True)
    if unfinished or ctx.failed_cells:
        what = [f"{len(unfinished)} trial(s) did not finish"] if unfinished else []
        what += [f"{len(ctx.failed_cells)} cell search(es) failed"] if ctx.failed_cells else []
        print(f"[{name}] {' and '.join(what)}; run the same command to retry them", file=sys.stderr, flush=True)
        return 1
    return 0
