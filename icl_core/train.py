"""Training: fresh prompts every step, Adam(W), a pure lr schedule, atomic checkpoints, exact resume.

On CPU a run killed at any moment and resumed from its last checkpoint ends bit-identical to an
uninterrupted one: the checkpoint carries model, optimizer, step and the data generator's state, and
metrics rows past the checkpoint are dropped on resume (they are re-logged identically).
"""

from __future__ import annotations

import contextlib
import csv
import math
import numbers
import os
import pickle
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import ConfigError, RunConfig, TrainConfig, dump_yaml, validate_run_config
from .cuda_graph import capturable_lr
from .errors import NonFiniteLossError
from .families import sample_prompts
from .model import ICLTransformer, ModelConfig
from .step import make_step

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
CONFIG = "config.yaml"
METRIC_FIELDS = ("step", "loss", "lr", "n_dims", "n_points", "time_s")
# What every checkpoint holds, what a resume needs on top, and the type of each entry.
CHECKPOINT_KEYS = ("step", "model", "model_config", "config", "config_hash")
RESUME_KEYS = (*CHECKPOINT_KEYS, "optimizer", "data_rng")
_ENTRY_TYPES: dict[str, type] = {
    "step": int, "model": dict, "model_config": dict, "config": dict, "config_hash": str, "optimizer": dict,
    "data_rng": torch.Tensor, "torch_rng": torch.Tensor, "extra": dict, "metrics": dict,
}
_RETRAIN = "retrain, or point at the run directory that wrote it"


class TrainCallback(Protocol):
    """Hooks for sweeps (Ray, MLflow) so icl_core itself imports neither."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant, cosine decay, or
    wsd (constant, then a linear fall to lr x min_lr_ratio over the last `decay_steps`)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        into_decay = step - (cfg.steps - cfg.decay_steps) + 1
        if into_decay <= 0:
            return cfg.lr
        return cfg.lr - (cfg.lr - min_lr) * min(1.0, into_decay / cfg.decay_steps)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda requested but no CUDA device is available")
    return torch.device(name)


def model_config(cfg: RunConfig) -> ModelConfig:
    return ModelConfig(
        dim=cfg.data.dim,
        max_points=max(cfg.data.n_points, cfg.eval_points),
        n_layer=cfg.model.n_layer,
        n_head=cfg.model.n_head,
        n_embd=cfg.model.n_embd,
        layout=cfg.model.layout,
    )


def build_model(cfg: RunConfig) -> ICLTransformer:
    """The model with its seeded initial weights (on CPU, so init does not depend on the device)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ICLTransformer(model_config(cfg))


def build_optimizer(model: ICLTransformer, cfg: TrainConfig, device: torch.device,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW; with weight_decay 0 this is Adam, as in Garg et al. Decay skips biases and LayerNorm gains.

    `capturable` (CUDA): state and learning rates on the device, so a CUDA graph can replay the step."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True}  # one pass over each tensor (CPU too: 3x faster than foreach at paper size)
    if capturable:
        extra["capturable"] = True
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **extra)
    if capturable:
        capturable_lr(optimizer, device)
    return optimizer


def data_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of every training prompt (kept apart from the init seed)."""
    return torch.Generator(device=device).manual_seed(seed + 1_000_003)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temp file beside `path` that replaces it when the block succeeds; on any failure the temp file is
    removed, `path` keeps its previous content, and an OSError is re-raised naming `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename != os.fspath(path):
            raise OSError(e.errno, e.strerror, os.fspath(path)) from e
        raise


class _WriteSink:
    """A binary file for torch.save that keeps the OSError of a failed write (torch reports a RuntimeError)."""

    def __init__(self, f: Any):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write-then-rename, so a reader (or a resume after SIGKILL) never sees a partial file; a failed write
    (e.g. a full disk) leaves no temp file, keeps the previous file and raises an OSError naming `path`."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        sink = _WriteSink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename `text`; a failed write leaves no temp file and the previous file as it was."""
    with _replacing(path) as tmp:
        tmp.write_text(text)


def plain_data(value: Any, where: str = "checkpoint") -> Any:
    """`value` as data a weights-only load accepts: tensors, dicts, lists, tuples, str, int, float, bool, None
    (paths, enums and numeric scalars are converted); anything else is a TypeError naming `where`."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Enum):
        return plain_data(value.value, where)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, os.PathLike):
        return plain_data(os.fspath(value), where)
    if isinstance(value, Mapping):
        return {plain_data(k, where): plain_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} holds a {type(value).__name__}; a checkpoint holds tensors and plain data only")


def _not_a_checkpoint(path: Path, why: str) -> ConfigError:
    return ConfigError("checkpoint", f"{path} is not an iclmix checkpoint ({why}): {_RETRAIN}")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu",
                    required: Sequence[str] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """A checkpoint loaded as tensors and plain data only (never running code from the file); a file that is
    unreadable, empty, truncated, foreign or lacks a `required` entry is a one-line ConfigError naming it."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a foreign pickle protocol
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise ConfigError("checkpoint", f"cannot read {path} ({e.strerror or e})") from None
    except torch.cuda.OutOfMemoryError:
        raise
    except pickle.UnpicklingError as e:
        refused = str(e).partition("Unsupported global: GLOBAL ")[2].split()
        why = f"loading it would run {refused[0]}, which is refused" if refused else "empty, truncated or foreign"
        raise _not_a_checkpoint(path, why) from None
    except Exception:  # torch reports a damaged file as EOFError, RuntimeError, KeyError, ...
        raise _not_a_checkpoint(path, "empty, truncated or foreign") from None
    if not isinstance(ckpt, dict):
        raise _not_a_checkpoint(path, f"it holds a {type(ckpt).__name__}, not a checkpoint mapping")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise _not_a_checkpoint(path, f"no {', '.join(missing)}; an older or foreign format")
    for key, kind in _ENTRY_TYPES.items():
        if key in ckpt and not isinstance(ckpt[key], kind):
            raise _not_a_checkpoint(path, f"its {key} is a {type(ckpt[key]).__name__}, not {kind.__name__}")
    return ckpt


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ICLTransformer, RunConfig]:
    """The trained model and resolved config of a run directory (config travels in the checkpoint)."""
    path = Path(run_dir) / CHECKPOINT
    ckpt = load_checkpoint(path, map_location=device)
    try:
        cfg = validate_run_config(ckpt["config"])
        model = ICLTransformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (ConfigError, TypeError, ValueError, RuntimeError) as e:
        raise _not_a_checkpoint(path, f"its model does not load: {_first_line(e)}") from None
    return model.to(device), cfg


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(":") if lines else type(e).__name__


@dataclass
class TrainResult:
    model: ICLTransformer
    config: RunConfig
    out_dir: Path
    step: int
    final_loss: float
    extra: dict[str, Any] = field(default_factory=dict)


def _truncate_metrics(path: Path, max_step: int) -> None:
    """Keep only complete rows up to `max_step` (rows past the checkpoint are re-logged on resume)."""
    rows: list[dict[str, str]] = []
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if None in row.values() or None in row:
                    break  # a line cut by the kill
                try:
                    if int(row["step"]) <= max_step:
                        rows.append(row)
                except (TypeError, ValueError):
                    break
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: Sequence[TrainCallback] = (),
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one model into `out_dir` (config.yaml, metrics.csv, checkpoint.pt).

    `extra` is stored in every checkpoint and returned on resume (sweeps keep their MLflow run id there).
    """
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise ConfigError("--out", f"{out} already holds a run; pass --resume to continue it or pick a new dir")
    device = resolve_device(cfg.train.device)
    out.mkdir(parents=True, exist_ok=True)

    model = build_model(cfg).to(device)
    graphed = cfg.train.cuda_graph and device.type == "cuda"  # on CPU the same config trains eagerly
    optimizer = build_optimizer(model, cfg.train, device, capturable=graphed)
    gen = data_generator(cfg.seed, device)
    step, extra, last = 0, dict(extra or {}), {}
    if resume and ckpt_path.exists():
        step, saved, last = _resume(ckpt_path, cfg, model, optimizer, gen, device, capturable=graphed)
        extra = {**saved, **extra}
    with _write_error("--out", out / CONFIG):
        atomic_write_text(out / CONFIG, dump_yaml(cfg))
    _truncate_metrics(out / METRICS, step)

    tc = cfg.train
    family = cfg.data.family
    loss_val = float("nan")
    first_bad = torch.zeros((), dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)
    start = time.perf_counter()
    bar = _progress_bar(tc.steps, step, progress)
    model.train()
    with open(out / METRICS, "a", newline="") as metrics_file, make_step(model, optimizer, tc, device) as train_step:
        writer = csv.DictWriter(metrics_file, fieldnames=METRIC_FIELDS)
        while step < tc.steps:
            lr = lr_at(step, tc)
            n_dims, n_points = cfg.data.dims_at(step), cfg.data.points_at(step)
            xs, ys = sample_prompts(family, tc.batch_size, n_points, cfg.data.dim, gen, cfg.data.noise_std, n_dims)
            loss = train_step(xs, ys, lr)
            # The first non-finite step is kept on the device and read at log and checkpoint steps only: a
            # per-step loss.item() would make the host wait for the GPU every step. Steps after it run on NaN
            # weights that are never logged or saved.
            first_bad = torch.where(torch.isfinite(loss) | (first_bad > 0), first_bad, step + 1)
            bad_loss = torch.where(first_bad == step + 1, loss.detach(), bad_loss)
            step += 1

            log_now = step % tc.log_every == 0 or step == 1 or step == tc.steps
            if log_now or step % tc.checkpoint_every == 0:
                _raise_if_non_finite(first_bad, bad_loss)
            if log_now:
                loss_val = loss.item()
                last = {"loss": loss_val, "lr": lr, "n_dims": n_dims, "n_points": n_points}
                writer.writerow({"step": step, **last, "time_s": round(time.perf_counter() - start, 3)})
                metrics_file.flush()
                for cb in callbacks:
                    cb.on_log(step, last)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                os.fsync(metrics_file.fileno())  # rows up to the checkpoint must survive a kill
                with _write_error("checkpoint", ckpt_path):
                    _save(out, model, optimizer, gen, step, cfg, extra, last)
                for cb in callbacks:
                    cb.on_checkpoint(step, ckpt_path, last)
    if bar is not None:
        bar.close()
    return TrainResult(model, cfg, out, step, last.get("loss", loss_val), extra)


def _resume(path: Path, cfg: RunConfig, model: ICLTransformer, optimizer: torch.optim.Optimizer,
            gen: torch.Generator, device: torch.device,
            capturable: bool) -> tuple[int, dict[str, Any], dict[str, float]]:
    """Load a checkpoint of this config into model, optimizer and data generator: (step, extra, last metrics)."""
    ckpt = load_checkpoint(path, map_location=device, required=RESUME_KEYS)
    if ckpt["config_hash"] != cfg.config_hash:
        raise ConfigError("--resume", f"{path} was written by another config (hash {ckpt['config_hash']})")
    # The saved groups carry the flags of the optimizer that wrote them (a bundle's or another device's);
    # this run keeps its own, so a graphed step still finds a capturable optimizer.
    flags = [{k: g[k] for k in ("capturable", "fused", "foreach") if k in g} for g in optimizer.param_groups]
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(optimizer.param_groups, flags, strict=True):
            group.update(own)
        gen.set_state(ckpt["data_rng"].to(gen.get_state().device))
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as e:
        raise _not_a_checkpoint(path, f"its state does not load: {_first_line(e)}") from None
    if capturable:
        capturable_lr(optimizer, device)  # the loaded groups carry their own lr objects
    return ckpt["step"], dict(ckpt.get("extra", {})), dict(ckpt.get("metrics", {}))


def _raise_if_non_finite(first_bad: torch.Tensor, bad_loss: torch.Tensor) -> None:
    if step := int(first_bad):
        raise NonFiniteLossError(step, bad_loss.item())


@contextlib.contextmanager
def _write_error(field: str, path: Path) -> Iterator[None]:
    """Turn a failed write of `path` (full disk, no permission) into a one-line error; nothing is lost."""
    try:
        yield
    except OSError as e:
        raise ConfigError(field, f"cannot write {path} ({e.strerror or e}); what was written before is kept: "
                                 "free space or fix permissions, then rerun with --resume") from e


def _save(out: Path, model, optimizer, gen, step, cfg: RunConfig, extra, metrics) -> None:
    """The checkpoint: tensors and plain data only, so it loads with `weights_only=True`."""
    state = model.state_dict()
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError("checkpoint.model holds a non-tensor entry")
    atomic_torch_save(
        {
            "step": int(step),
            "model": state,
            "model_config": plain_data(model.cfg.to_dict(), "checkpoint.model_config"),
            "optimizer": plain_data(optimizer.state_dict(), "checkpoint.optimizer"),
            "data_rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": plain_data(cfg.to_dict(), "checkpoint.config"),
            "config_hash": cfg.config_hash,
            "extra": plain_data(dict(extra), "checkpoint.extra"),
            "metrics": plain_data(dict(metrics), "checkpoint.metrics"),
        },
        out / CHECKPOINT,
    )


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
