"""Function families: priors over f: R^d -> R, each scaled so that E[f(x)^2] = 1 under x ~ N(0, I).

A family is plain config data (`{family: sparse_linear, nnz: 3}`) built through a registry; its
`canonical_id` (e.g. ``sparse_linear(nnz=3)``) names it wherever results are stored. `sample` draws a
batch of independent functions from an explicit `torch.Generator` on any device. Functions only read the
first `active_dim` coordinates of x (Garg et al.'s curriculum zeroes the others).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import ConfigError


class Functions(ABC):
    """A batch of B sampled functions: call with xs of shape (B, N, d) to get (B, N)."""

    @abstractmethod
    def __call__(self, xs: Tensor) -> Tensor: ...


class Family(ABC):
    """A prior over functions. Subclasses are frozen dataclasses whose fields are the family's parameters."""

    name: ClassVar[str]

    @abstractmethod
    def sample(self, n: int, dim: int, generator: torch.Generator, active_dim: int | None = None) -> Functions:
        """Draw `n` independent functions of R^dim (reading only the first `active_dim` coordinates)."""

    def check(self, dim: int) -> None:  # noqa: B027 (a hook: most families fit any dim)
        """Raise ConfigError if the family cannot be used at input dimension `dim`."""

    def floats_per_prompt(self, dim: int, n_points: int) -> int:
        """Floats one sampled function holds while a prompt is made (its weights, its hidden units)."""
        return dim

    def label(self) -> str:
        """The family as a figure names it, e.g. `sparse linear (1 non-zero)`."""
        return self.name.replace("_", " ")

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @cached_property  # ids name results everywhere: built once per family
    def canonical_id(self) -> str:
        items = [f"{k}={_id_value(v)}" for k, v in self.params().items()]
        return f"{self.name}({','.join(items)})" if items else self.name

    def to_spec(self) -> dict[str, Any]:
        """The family as plain config data, every default filled in (round-trips through build_family)."""
        spec: dict[str, Any] = {"family": self.name}
        for k, v in self.params().items():
            spec[k] = v.to_spec() if isinstance(v, Family) else v
        return spec

    def __str__(self) -> str:
        return self.canonical_id


def _id_value(v: Any) -> str:
    if isinstance(v, Family):
        return v.canonical_id
    if isinstance(v, float):
        return repr(v)
    return str(v)


# The parser of what `canonical_id` prints: stored ids (``sparse_linear(nnz=3)``,
# ``mixture(0.5*linear+0.5*sine(freq_lo=1.0,freq_hi=2.0))``) back into config specs.
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$")
_INT = re.compile(r"^[+-]?\d+$")


def _split_top(text: str, sep: str) -> list[str]:
    """Split at `sep` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_value(text: str) -> Any:
    if _INT.match(text):
        return int(text)
    if _NUMBER.match(text):
        return float(text)
    if "(" in text or text in FAMILIES or text == "mixture":
        return _parse_spec(text)
    return text


def _parse_spec(text: str) -> Any:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:\((.*)\))?", text.strip(), flags=re.S)
    if not m:
        raise ConfigError("family", f"not a canonical family id: {text!r}")
    name, inner = m.group(1), m.group(2)
    if name == "mixture":
        entries = []
        for part in _split_top(inner or "", "+"):
            weight, sep, fid = part.partition("*")
            if not sep:
                raise ConfigError("mixture", f"expected weight*family in {text!r}")
            spec = _parse_spec(fid)
            if isinstance(spec, list):
                raise ConfigError("mixture", f"nested mixture in {text!r}")
            entries.append({**spec, "weight": float(weight)})
        return entries
    spec: dict[str, Any] = {"family": name}
    if inner:
        for arg in _split_top(inner, ","):
            key, sep, value = arg.partition("=")
            if not sep:
                raise ConfigError("family", f"expected key=value in {text!r}")
            spec[key.strip()] = _parse_value(value.strip())
    return spec


def parse_family_id(text: str) -> Any:
    """The config spec of a canonical id: a dict for a family, a list of weighted dicts for a mixture.

    Round-trips: ``task_family(parse_family_id(f.canonical_id)).canonical_id == f.canonical_id``.
    """
    return _parse_spec(text)


def family_from_id(text: str) -> Family:
    """The family (or mixture) a canonical id names."""
    spec = parse_family_id(text)
    return build_mixture(spec) if isinstance(spec, list) else build_family(spec)


FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family buildable from config by its `name`."""
    FAMILIES[cls.name] = cls
    return cls


def _device(generator: torch.Generator) -> torch.device:
    return generator.device


def _active(dim: int, active_dim: int | None) -> int:
    return dim if active_dim is None else active_dim


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, device=_device(generator))


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator, device=_device(generator))


class LinearFunctions(Functions):
    """f_b(x) = w_b · x."""

    def __init__(self, w: Tensor):
        self.w = w  # (B, d)

    def __call__(self, xs: Tensor) -> Tensor:
        return torch.einsum("bnd,bd->bn", xs, self.w.to(xs.dtype))


@register
@dataclass(frozen=True)
class Linear(Family):
    """Dense linear: w ~ N(0, I_a / a) over the a active coordinates (Garg et al., rescaled to unit variance)."""

    name: ClassVar[str] = "linear"

    def sample(self, n, dim, generator, active_dim=None):
        a = _active(dim, active_dim)
        w = torch.zeros(n, dim, device=_device(generator))
        w[:, :a] = _randn((n, a), generator) / math.sqrt(a)
        return LinearFunctions(w)


@register
@dataclass(frozen=True)
class SparseLinear(Family):
    """Sparse linear: a support of `nnz` active coordinates uniform at random, non-zeros ~ N(0, 1/nnz)."""

    name: ClassVar[str] = "sparse_linear"
    nnz: int = 3  # Garg et al. used 3; the paper uses 2 of 20 (set it in the config)

    def __post_init__(self):
        if not isinstance(self.nnz, int) or isinstance(self.nnz, bool) or self.nnz < 1:
            raise ConfigError("nnz", f"must be a positive integer, got {self.nnz!r}")

    def check(self, dim):
        if self.nnz > dim:
            raise ConfigError("nnz", f"nnz={self.nnz} exceeds the input dimension dim={dim}")

    def label(self) -> str:
        return f"sparse linear ({self.nnz} non-zero)"

    def sample(self, n, dim, generator, active_dim=None):
        a = _active(dim, active_dim)
        nnz = min(self.nnz, a)  # early in the curriculum fewer coordinates may be active
        # A uniformly random support per function: the nnz smallest of a uniform keys.
        support = _rand((n, a), generator).argsort(dim=1)[:, :nnz]
        values = _randn((n, nnz), generator) / math.sqrt(nnz)
        w = torch.zeros(n, dim, device=_device(generator))
        w.scatter_(1, support, values)
        return LinearFunctions(w)


class SineFunctions(Functions):
    """f_b(x) = sqrt(2) · sin(omega_b · u_b·x + phi_b)."""

    def __init__(self, u: Tensor, omega: Tensor, phi: Tensor):
        self.u, self.omega, self.phi = u, omega, phi

    def __call__(self, xs: Tensor) -> Tensor:
        proj = torch.einsum("bnd,bd->bn", xs, self.u.to(xs.dtype))
        return math.sqrt(2.0) * torch.sin(self.omega[:, None] * proj + self.phi[:, None])


@register
@dataclass(frozen=True)
class Sine(Family):
    """Sinusoid of a random projection: u uniform on the unit sphere, omega ~ U[freq_lo, freq_hi], phase ~ U[0, 2pi)."""

    name: ClassVar[str] = "sine"
    freq_lo: float = 0.5
    freq_hi: float = 2.0

    def __post_init__(self):
        for field in ("freq_lo", "freq_hi"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(field, f"must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, field, float(v))
        if self.freq_lo > self.freq_hi:
            raise ConfigError("freq_hi", f"freq_hi={self.freq_hi} is below freq_lo={self.freq_lo}")

    def label(self) -> str:
        band = f"{self.freq_lo:g}" if self.freq_lo == self.freq_hi else f"{self.freq_lo:g}–{self.freq_hi:g}"
        return f"sine (ω = {band})"

    def sample(self, n, dim, generator, active_dim=None):
        a = _active(dim, active_dim)
        u = torch.zeros(n, dim, device=_device(generator))
        g = _randn((n, a), generator)
        u[:, :a] = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        omega = self.freq_lo + (self.freq_hi - self.freq_lo) * _rand((n,), generator)
        phi = 2 * math.pi * _rand((n,), generator)
        return SineFunctions(u, omega, phi)


class ReluNetFunctions(Functions):
    """f_b(x) = sum_h a_bh · relu(W_bh · x)."""

    def __init__(self, w1: Tensor, w2: Tensor):
        self.w1, self.w2 = w1, w2  # (B, H, d), (B, H)

    def __call__(self, xs: Tensor) -> Tensor:
        hidden = torch.relu(torch.einsum("bnd,bhd->bnh", xs, self.w1.to(xs.dtype)))
        return torch.einsum("bnh,bh->bn", hidden, self.w2.to(xs.dtype))


@register
@dataclass(frozen=True)
class ReluNet(Family):
    """Two-layer ReLU net (Garg et al.: 100 hidden units): W ~ N(0, I_a/a), output weights ~ N(0, 2/hidden)."""

    name: ClassVar[str] = "relu_net"
    hidden: int = 100

    def __post_init__(self):
        if not isinstance(self.hidden, int) or isinstance(self.hidden, bool) or self.hidden < 1:
            raise ConfigError("hidden", f"must be a positive integer, got {self.hidden!r}")

    def floats_per_prompt(self, dim, n_points):
        return self.hidden * (dim + 1 + n_points)

    def label(self) -> str:
        return f"ReLU net ({self.hidden} units)"

    def sample(self, n, dim, generator, active_dim=None):
        a = _active(dim, active_dim)
        w1 = torch.zeros(n, self.hidden, dim, device=_device(generator))
        w1[:, :, :a] = _randn((n, self.hidden, a), generator) / math.sqrt(a)
        w2 = _randn((n, self.hidden), generator) * math.sqrt(2.0 / self.hidden)
        return ReluNetFunctions(w1, w2)


class ConvexFunctions(Functions):
    def __init__(self, fa: Functions, fb: Functions, alpha: float, scale: float):
        self.fa, self.fb, self.alpha, self.scale = fa, fb, alpha, scale

    def __call__(self, xs: Tensor) -> Tensor:
        return (self.alpha * self.fa(xs) + (1 - self.alpha) * self.fb(xs)) / self.scale


@register
@dataclass(frozen=True)
class Convex(Family):
    """alpha·f_a + (1-alpha)·f_b with f_a, f_b drawn independently, divided by sqrt(alpha² + (1-alpha)²).

    Both families are zero-mean and independent, so the division restores unit variance.
    """

    name: ClassVar[str] = "convex"
    a: Family
    b: Family
    alpha: float = 0.5

    def __post_init__(self):
        a = self.alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0.0 <= a <= 1.0:
            raise ConfigError("alpha", f"must be a number in [0, 1], got {a!r}")
        object.__setattr__(self, "alpha", float(a))

    def check(self, dim):
        for field in ("a", "b"):
            try:
                getattr(self, field).check(dim)
            except ConfigError as e:
                raise e.under(field) from None

    def floats_per_prompt(self, dim, n_points):
        return self.a.floats_per_prompt(dim, n_points) + self.b.floats_per_prompt(dim, n_points)

    def label(self) -> str:
        return f"{self.alpha:g}·{self.a.label()} + {1 - self.alpha:g}·{self.b.label()}"

    def sample(self, n, dim, generator, active_dim=None):
        fa = self.a.sample(n, dim, generator, active_dim)
        fb = self.b.sample(n, dim, generator, active_dim)
        scale = math.sqrt(self.alpha**2 + (1 - self.alpha) ** 2)
        return ConvexFunctions(fa, fb, self.alpha, scale)


class MixtureFunctions(Functions):
    """Each prompt's function comes from one component; `component[b]` says which."""

    def __init__(self, component: Tensor, parts: list[tuple[Tensor, Functions]]):
        self.component = component
        self.parts = parts

    def __call__(self, xs: Tensor) -> Tensor:
        out = torch.empty(xs.shape[:2], dtype=xs.dtype, device=xs.device)
        for idx, fn in self.parts:
            out[idx] = fn(xs[idx]).to(xs.dtype)
        return out


@dataclass(frozen=True)
class Mixture(Family):
    """Per prompt, pick a component family with probability `weights[i]`, then draw f from it."""

    name: ClassVar[str] = "mixture"
    components: tuple[Family, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.components) == 0:
            raise ConfigError("mixture", "needs at least one component")
        if len(self.components) != len(self.weights):
            raise ConfigError("mixture", "components and weights differ in length")
        for i, w in enumerate(self.weights):
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"[{i}].weight", f"must be a finite number >= 0, got {w!r}")
        total = sum(self.weights)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError("weight", f"mixture weights must sum to 1, they sum to {total:g}")
        ids = [c.canonical_id for c in self.components]
        if len(set(ids)) != len(ids):
            raise ConfigError("family", f"a family appears twice in the mixture: {ids}")

    def floats_per_prompt(self, dim, n_points):
        return max(c.floats_per_prompt(dim, n_points) for c in self.components)

    def label(self) -> str:
        if len(self.components) == 1:
            return self.components[0].label()
        return " + ".join(f"{w:g} {c.label()}" for c, w in self.items())

    def check(self, dim):
        for i, c in enumerate(self.components):
            try:
                c.check(dim)
            except ConfigError as e:
                raise e.under(f"[{i}]") from None

    @cached_property
    def canonical_id(self) -> str:
        return "mixture(" + "+".join(f"{w!r}*{c.canonical_id}" for c, w in self.items()) + ")"

    def items(self) -> list[tuple[Family, float]]:
        """(family, weight) pairs."""
        return list(zip(self.components, self.weights))

    def weight_of(self, family_id: str) -> float:
        """The weight of the component with this canonical id (0 when absent)."""
        return sum(w for c, w in self.items() if c.canonical_id == family_id)

    def to_spec(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [{**c.to_spec(), "weight": w} for c, w in self.items()]

    def sample(self, n, dim, generator, active_dim=None):
        probs = torch.tensor(self.weights, dtype=torch.float32, device=_device(generator))
        component = torch.multinomial(probs, n, replacement=True, generator=generator)
        parts = []
        for i, family in enumerate(self.components):
            idx = (component == i).nonzero(as_tuple=True)[0]
            if len(idx):
                parts.append((idx, family.sample(len(idx), dim, generator, active_dim)))
        return MixtureFunctions(component, parts)


def build_family(spec: Mapping[str, Any]) -> Family:
    """Build a family from plain config data, e.g. ``{"family": "sparse_linear", "nnz": 3}``."""
    if isinstance(spec, Family):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError("family", f"a family spec must be a mapping like {{family: linear}}, got {spec!r}")
    if "family" not in spec:
        raise ConfigError("family", "missing (one of: " + ", ".join(sorted(FAMILIES)) + ")")
    name = spec["family"]
    if name not in FAMILIES:
        raise ConfigError("family", f"unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    cls = FAMILIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "family":
            continue
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ConfigError(key, f"unknown parameter for family {name!r} (known: {known})")
        if fields[key].type in ("Family", Family):
            try:
                value = build_family(value)
            except ConfigError as e:
                raise e.under(key) from None
        kwargs[key] = value
    for f in fields.values():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and f.name not in kwargs:
            raise ConfigError(f.name, f"required for family {name!r}")
    return cls(**kwargs)


def canonical_specs(specs: Iterable[Any], build: Callable[[Any], Family], where: str = "") -> list[Any]:
    """Each spec built and written back whole (every default filled in); an error names `where[i]`."""
    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(build(spec).to_spec())
        except ConfigError as e:
            raise e.under(f"{where}[{i}]") from None
    return out


def build_mixture(entries: list[Mapping[str, Any]]) -> Mixture:
    """A mixture from config entries ``[{family: ..., weight: ...}, ...]``.

    Weights may all be omitted (equal weights); otherwise every entry needs one.
    """
    try:  # families are immutable: a sweep's thousands of configs share a few mixtures, each built once
        key = json.dumps(entries, sort_keys=True)
    except (TypeError, ValueError):  # e.g. Family objects as entries
        return _build_mixture(entries)
    mixture = _MIXTURES.get(key)
    if mixture is None:
        mixture = _build_mixture(entries)
        if len(_MIXTURES) < 10_000:
            _MIXTURES[key] = mixture
    return mixture


_MIXTURES: dict[str, Mixture] = {}


def _build_mixture(entries: list[Mapping[str, Any]]) -> Mixture:
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError("mixture", "must be a non-empty list of families with weights")
    weights: list[float | None] = []
    comps: list[Family] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"[{i}]", f"must be a mapping like {{family: linear, weight: 0.5}}, got {entry!r}")
        entry = dict(entry)
        w = entry.pop("weight", None)
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))):
            raise ConfigError(f"[{i}].weight", f"must be a number, got {w!r}")
        weights.append(None if w is None else float(w))
        try:
            comps.append(build_family(entry))
        except ConfigError as e:
            raise e.under(f"[{i}]") from None
    if all(w is None for w in weights):
        weights = [1.0 / len(comps)] * len(comps)
    elif any(w is None for w in weights):
        i = weights.index(None)
        raise ConfigError(f"[{i}].weight", "missing (give every component a weight, or none for equal weights)")
    return Mixture(tuple(comps), tuple(weights))  # type: ignore[arg-type]


def sample_prompts(
    family: Family,
    batch: int,
    n_points: int,
    dim: int,
    generator: torch.Generator,
    noise_std: float = 0.0,
    active_dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fresh prompts: xs ~ N(0, I) of shape (batch, n_points, dim), inactive coordinates zero; ys = f(xs) + noise."""
    a = _active(dim, active_dim)
    xs = torch.zeros(batch, n_points, dim, device=_device(generator))
    xs[:, :, :a] = _randn((batch, n_points, a), generator)
    fn = family.sample(batch, dim, generator, active_dim=a)
    ys = fn(xs)
    if noise_std > 0:
        ys = ys + noise_std * _randn(tuple(ys.shape), generator)
    return xs, ys

