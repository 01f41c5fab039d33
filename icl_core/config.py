"""Run configs: YAML in, validated pydantic models inside, a canonical hash out.

Defaults follow Garg et al. (2022) at paper scale; CPU-scale configs override them.
Every error is a `ConfigError` whose message is one line naming the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, Strict, check_writable_folder, from_validation_error  # noqa: F401 (re-exported)
from .estimators import ESTIMATORS
from .families import Family, Mixture, build_family, build_mixture, canonical_specs

# Limits with reasons (README, "Limits"): far above any run this project makes, low enough that a typo fails here
# with its field named rather than late, in an allocation or an overflow.
MAX_SEED = 2**32 - 1  # numpy's and every seeded library's range
MAX_STEPS = 10**8  # 200 x the paper's 500 k steps
MAX_TRIAL_GIB = 64.0  # the estimated memory of one trial: model and Adam state, activations, the prompt batch


class CurriculumAxis(Strict):
    """Grow a quantity from `start` to `end` by `inc` every `interval` steps (Garg et al.)."""

    start: int = Field(ge=1)
    end: int = Field(ge=1)
    inc: int = Field(ge=0)
    interval: int = Field(ge=1, le=MAX_STEPS)

    @model_validator(mode="after")
    def _start_to_end(self) -> CurriculumAxis:
        if self.start > self.end:
            raise ConfigError("start", f"start={self.start} is past end={self.end}: a curriculum grows")
        return self

    def at(self, step: int) -> int:
        return min(self.end, self.start + self.inc * (step // self.interval))


class Curriculum(Strict):
    """Garg et al.: dims 5 -> 20 (+1 every 2000 steps), points 11 -> 41 (+2 every 2000 steps)."""

    dims: CurriculumAxis | None = None
    points: CurriculumAxis | None = None


class DataConfig(Strict):
    dim: int = Field(20, ge=1)
    n_points: int = Field(41, ge=1)
    noise_std: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    mixture: list[dict[str, Any]] = Field(default_factory=lambda: [{"family": "linear", "weight": 1.0}])
    curriculum: Curriculum | None = None  # off by default; sweeps/mixture_weights.yaml spells out Garg's

    @field_validator("mixture", mode="before")
    @classmethod
    def _canonical_mixture(cls, v: Any) -> Any:
        return build_mixture(v).to_spec()  # a ConfigError names the field inside the mixture

    @model_validator(mode="after")
    def _check_dims(self) -> DataConfig:
        try:
            self.family.check(self.dim)
        except ConfigError as e:
            raise e.under("mixture") from None
        c = self.curriculum
        if c and c.dims and c.dims.end > self.dim:
            raise ConfigError("curriculum.dims.end", f"{c.dims.end} exceeds dim={self.dim}")
        if c and c.points and c.points.end > self.n_points:
            raise ConfigError("curriculum.points.end", f"{c.points.end} exceeds n_points={self.n_points}")
        return self

    @cached_property
    def family(self) -> Mixture:
        return build_mixture(self.mixture)

    def dims_at(self, step: int) -> int:
        c = self.curriculum
        return c.dims.at(step) if c and c.dims else self.dim

    def points_at(self, step: int) -> int:
        c = self.curriculum
        return c.points.at(step) if c and c.points else self.n_points


class ModelConfigSpec(Strict):
    """Transformer size (paper and Garg et al.: 12 layers, 8 heads, 256 dims)."""

    n_layer: int = Field(12, ge=1)
    n_head: int = Field(8, ge=1)
    n_embd: int = Field(256, ge=1)
    # Garg et al.'s tokens, or y in its own input channel (icl_core.model's docstring; docs/reproduction.md)
    layout: Literal["garg", "y_channel"] = "garg"

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfigSpec:
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd", f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        return self


class TrainConfig(Strict):
    """Adam(W) training; defaults are Garg et al.'s (lr 1e-4 constant, batch 64, 500k steps)."""

    steps: int = Field(500_000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0.0, allow_inf_nan=False)
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    decay_steps: int = Field(0, ge=0, le=MAX_STEPS)  # wsd only: the last steps, lr falling linearly to the floor
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables; Garg et al. did not clip, clipping only guards spikes
    checkpoint_every: int = Field(1000, ge=1, le=MAX_STEPS)
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    cuda_graph: bool = False  # on CUDA, replay the whole step from a CUDA graph (icl_core.cuda_graph); eager on CPU
    batch_threads: int = Field(1, ge=1)  # on CPU, split each batch over this many threads (icl_core.threaded_step)

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_pair(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # YAML has lists, not tuples

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        for i, b in enumerate(v):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"[{i}]", f"Adam's betas are in [0, 1), got {b!r}")
        return v

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ConfigError("warmup_steps", f"{self.warmup_steps} warm-up steps in a run of {self.steps}")
        return self

    @model_validator(mode="after")
    def _decay_fits(self) -> TrainConfig:
        if self.schedule == "wsd" and not 0 < self.decay_steps <= self.steps - self.warmup_steps:
            raise ConfigError("decay_steps", f"schedule wsd needs 0 < decay_steps <= steps - warmup_steps "
                              f"({self.steps - self.warmup_steps}); got {self.decay_steps}")
        if self.schedule != "wsd" and self.decay_steps:
            raise ConfigError("decay_steps", f"only schedule wsd decays over decay_steps (schedule is {self.schedule})")
        return self

    @model_validator(mode="after")
    def _one_way_to_speed_up(self) -> TrainConfig:
        if self.compile and self.cuda_graph:
            raise ConfigError("cuda_graph", "train.cuda_graph and train.compile are two ways to the same end; "
                              "set one of them")
        if self.batch_threads > 1 and self.compile:
            raise ConfigError("batch_threads", "train.batch_threads and train.compile do not combine (the shards "
                              "would run compiled code from several threads at once); set one of them")
        if self.batch_threads > self.batch_size:
            raise ConfigError("batch_threads", f"{self.batch_threads} threads need a batch of at least as many "
                              f"prompts (train.batch_size is {self.batch_size})")
        return self


class EvalConfig(Strict):
    """Evaluation after training: the same prompts for the model and every estimator (Garg: 1280 prompts)."""

    n_prompts: int = Field(1280, ge=2, le=10**7)
    seed: int = Field(12345, ge=0, le=MAX_SEED)
    n_points: int | None = Field(None, ge=1)  # default: data.n_points
    tasks: list[dict[str, Any]] = Field(default_factory=list)  # empty: each pretraining component
    estimators: list[str] = Field(default_factory=lambda: list(ESTIMATORS))

    @field_validator("tasks", mode="before")
    @classmethod
    def _canonical_tasks(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ConfigError("", "must be a list of family specs like {family: linear}")
        return canonical_specs(v, task_family)

    @field_validator("estimators")
    @classmethod
    def _known_estimators(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if name not in ESTIMATORS:
                raise ConfigError(f"[{i}]", f"unknown estimator {name!r} (known: {', '.join(ESTIMATORS)})")
        return v


# The sizes behind each part of the memory estimate, each with its paper-scale value (Garg et al.).
_MEMORY_INPUTS: dict[str, tuple[tuple[str, float], ...]] = {
    "model and Adam state": (("model.n_layer", 12), ("model.n_embd", 256), ("data.dim", 20), ("data.n_points", 41)),
    "activations": (("train.batch_size", 64), ("data.n_points", 41), ("model.n_layer", 12), ("model.n_embd", 256),
                    ("model.n_head", 8)),
    "prompt batch": (("train.batch_size", 64), ("data.dim", 20), ("data.n_points", 41), ("data.mixture", 20)),
}


def memory_problem(cfg: RunConfig, limit_bytes: float, limit: str, members: int = 1) -> tuple[str, str] | None:
    """(field, message) when the memory estimate of `cfg` (times `members`, a bundle's size) is over
    `limit_bytes`, described as `limit`."""
    parts = {k: v * members for k, v in memory_estimate(cfg).items()}
    total = sum(parts.values())
    if total <= limit_bytes:
        return None
    what = ", ".join(f"{k} {v / 2**30:.3g}" for k, v in parts.items())
    field = _memory_culprit(cfg, max(parts, key=parts.__getitem__)) if members == 1 else "resources.bundle"
    trial = "a trial" if members == 1 else f"a trial of {members} bundled configs"
    return field, f"{trial} would need about {total / 2**30:.3g} GiB ({what}), over {limit}"


def _memory_culprit(cfg: RunConfig, part: str) -> str:
    """The field to name for an oversized part: its input furthest above paper scale."""

    def value(name: str) -> float:
        if name == "data.mixture":  # the floats behind one sampled function (a ReLU net's hidden units)
            return cfg.data.family.floats_per_prompt(cfg.data.dim, cfg.data.n_points)
        section, key = name.split(".")
        return getattr(getattr(cfg, section), key)

    return max(_MEMORY_INPUTS[part], key=lambda item: value(item[0]) / item[1])[0]


def memory_estimate(cfg: RunConfig) -> dict[str, float]:
    """Bytes one training step holds, by part: fp32 weights, gradients and Adam's two moments; activations kept
    for the backward pass (Korthikanti et al. 2022, doubled for fp32); the prompts and the functions behind them."""
    d, m, t = cfg.data, cfg.model, cfg.train
    tokens = 2 * d.n_points
    params = m.n_layer * (12 * m.n_embd**2 + 13 * m.n_embd) + m.n_embd * (d.dim + 2 + tokens)
    activations = m.n_layer * 2 * tokens * t.batch_size * (34 * m.n_embd + 5 * m.n_head * tokens)
    prompts = t.batch_size * (2 * d.n_points * (d.dim + 1) + d.family.floats_per_prompt(d.dim, d.n_points))
    return {"model and Adam state": 16.0 * params, "activations": float(activations), "prompt batch": 4.0 * prompts}


def task_family(spec: Any) -> Family:
    """An eval task: a family spec, or a list of weighted specs for a mixture prior."""
    if isinstance(spec, list):
        return build_mixture(spec)
    return build_family(spec)


class RunConfig(Strict):
    """One training run: seed, data, model, train and an optional eval section."""

    seed: int = Field(0, ge=0, le=MAX_SEED)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfigSpec = Field(default_factory=ModelConfigSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig | None = None

    @model_validator(mode="after")
    def _fits_in_memory(self) -> RunConfig:
        problem = memory_problem(self, MAX_TRIAL_GIB * 2**30, f"the {MAX_TRIAL_GIB:g} GiB limit per trial")
        if problem:
            raise ConfigError(*problem)
        return self

    @model_validator(mode="after")
    def _check_eval(self) -> RunConfig:
        if self.eval is None:
            return self
        for i, spec in enumerate(self.eval.tasks):
            try:
                task_family(spec).check(self.data.dim)
            except ConfigError as e:
                raise e.under(f"eval.tasks[{i}]") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def config_hash(self) -> str:
        data = self.to_dict()
        for (section, key), default in HASHED_ONLY_WHEN_SET.items():
            if data.get(section, {}).get(key, default) == default:
                data[section].pop(key, None)
        return config_hash(data)

    @property
    def evaluation(self) -> EvalConfig:
        """The eval section, its defaults where the config has none."""
        return self.eval or EvalConfig()

    @property
    def eval_points(self) -> int:
        """Prompt length at evaluation (default: the training length)."""
        return self.evaluation.n_points or self.data.n_points

    def eval_tasks(self) -> list[Family]:
        """The eval tasks; by default each component of the pretraining mixture."""
        if self.eval and self.eval.tasks:
            return [task_family(t) for t in self.eval.tasks]
        return list(self.data.family.components)


def validate_run_config(data: Any) -> RunConfig:
    """Validate plain data as a run config, raising ConfigError naming the field."""
    if not isinstance(data, Mapping):
        raise ConfigError("", "a run config must be a YAML mapping with data/model/train sections")
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as e:
        raise from_validation_error(e) from None


def parse_override(item: str) -> tuple[str, Any]:
    """``dotted.key=value`` with the value parsed as YAML (so numbers, lists and maps work)."""
    if "=" not in item:
        raise ConfigError("--set", f"expected dotted.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, creating intermediate mappings."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, "not a valid dotted key")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section, cannot set a key inside it")
        node = nxt
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `3e-4` is a float (as in YAML 1.2, not a string) and a key written twice
    in one mapping is an error (not the last one silently winning)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key == "<<" or not isinstance(key, str | int | float | bool):  # merge keys; unhashable keys
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str) -> Any:
    """YAML text as plain data, read by the one loader every config, sweep file and `--set` goes through."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning a missing, unreadable, binary or malformed file into a one-line ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(str(path), "is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(str(path), "no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(str(path), f"cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not a UTF-8 text file (a binary file?)") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise ConfigError(str(path), f"{problem}{where}") from None
    except RecursionError:
        raise ConfigError(str(path), "nested too deeply") from None


def load_run_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a YAML run config and apply ``--set dotted.key=value`` overrides."""
    data = read_yaml(path)
    if data is None or data == {}:
        raise ConfigError(str(path), "is empty: a run config names at least its data, model and train sections "
                          "(configs/example.yaml is one to start from)")
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a run config must be a YAML mapping")
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return validate_run_config(data)


# Fields added after sweeps had run, hashed only away from their default: the trials of those sweeps keep
# their hashes, so a new `sweep run` still finds them finished.
HASHED_ONLY_WHEN_SET: dict[tuple[str, str], Any] = {
    ("train", "cuda_graph"): False, ("train", "batch_threads"): 1, ("model", "layout"): "garg",
    ("train", "decay_steps"): 0,
}


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(data: Mapping[str, Any]) -> str:
    """A stable short hash of a resolved config (key order and formatting do not matter)."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
