"""Coverage descriptors of a pretraining mixture, parameter axes of an eval task, and the pretraining support.

Everything here works on `icl_core.families` objects (`family_from_id` turns a stored canonical id back into one).
"""

from __future__ import annotations

import math
import re
from typing import Any

from icl_core.families import Convex, Family, Linear, Mixture, Sine, SparseLinear, family_from_id, parse_family_id  # noqa: F401 (re-exported)

COVERAGE_AXES = ("nnz_set", "freq_band", "mixture")  # besides `weight:<family id>` and any trial column
TEST_AXES = ("nnz", "freq", "alpha", "task")

# ---------------------------------------------------------------- coverage of a pretraining mixture


def _support_id(family: Family, dim: int) -> str:
    """Identity up to distribution: sparse_linear with nnz >= dim is dense linear."""
    if isinstance(family, SparseLinear) and family.nnz >= dim:
        return Linear().canonical_id
    return family.canonical_id


def covered_nnz(mixture: Mixture, dim: int) -> tuple[int, ...]:
    """Sparsity levels with positive weight (dense linear counts as nnz = dim)."""
    out = set()
    for fam, w in mixture.items():
        if w <= 0:
            continue
        if isinstance(fam, SparseLinear):
            out.add(min(fam.nnz, dim))
        elif isinstance(fam, Linear):
            out.add(dim)
    return tuple(sorted(out))


def covered_bands(mixture: Mixture) -> tuple[tuple[float, float], ...]:
    """The union of the sine components' frequency bands (positive weight), as merged intervals."""
    bands = sorted((f.freq_lo, f.freq_hi) for f, w in mixture.items() if w > 0 and isinstance(f, Sine))
    merged: list[list[float]] = []
    for lo, hi in bands:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _g(x: float) -> str:
    return f"{x:g}"


def nnz_set_label(levels: tuple[int, ...]) -> str:
    return "{" + ",".join(str(n) for n in levels) + "}" if levels else "{}"


def freq_band_label(bands: tuple[tuple[float, float], ...]) -> str:
    return " ∪ ".join(f"[{_g(lo)}, {_g(hi)}]" for lo, hi in bands) if bands else "none"


def coverage_descriptors(mixture: Mixture, dim: int) -> dict[str, Any]:
    """Per-trial coverage columns: the mixture id, one weight per family, the nnz set and the frequency band."""
    bands = covered_bands(mixture)
    levels = covered_nnz(mixture, dim)
    out: dict[str, Any] = {
        "mixture": mixture.canonical_id,
        "nnz_set": nnz_set_label(levels),
        "freq_band": freq_band_label(bands),
        "freq_width": float(sum(hi - lo for lo, hi in bands)) if bands else math.nan,
    }
    for fam, w in mixture.items():
        out[f"weight:{fam.canonical_id}"] = float(w)
    return out


def coverage_sort_key(axis: str, label: Any) -> tuple:
    """Order of coverage values along a map's rows."""
    if axis == "nnz_set" and isinstance(label, str) and label.startswith("{"):
        levels = [int(v) for v in label.strip("{}").split(",") if v]
        return (len(levels), levels)
    if axis == "freq_band" and isinstance(label, str):
        nums = [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", label)]
        width = sum(nums[i + 1] - nums[i] for i in range(0, len(nums) - 1, 2))
        return (width, nums)
    return ()


# ---------------------------------------------------------------- axes of an eval task and the support


def task_axes(task: Family, dim: int) -> dict[str, Any]:
    """Test-axis values of an eval task (NaN where the axis does not apply)."""
    nnz = freq = alpha = math.nan
    if isinstance(task, SparseLinear):
        nnz = float(min(task.nnz, dim))
    elif isinstance(task, Linear):
        nnz = float(dim)
    elif isinstance(task, Sine) and task.freq_lo == task.freq_hi:
        freq = task.freq_lo
    elif isinstance(task, Convex):
        alpha = task.alpha
    return {"task": task.canonical_id, "task_family": task.name, "nnz": nnz, "freq": freq, "alpha": alpha}


def in_support(task: Family, mixture: Mixture, dim: int) -> bool:
    """Is the eval task inside the pretraining support of `mixture`?

    A family is inside when the mixture gives it weight > 0 (sparse_linear with nnz >= dim counts as
    dense linear); a sine task when its frequency band lies inside the union of covered bands; a convex
    combination only at alpha = 1 (pure `a`) or alpha = 0 (pure `b`); a mixture task when all its
    components with weight > 0 are inside.
    """
    if isinstance(task, Mixture):
        return all(in_support(f, mixture, dim) for f, w in task.items() if w > 0)
    if isinstance(task, Convex):
        if task.alpha == 1.0:
            return in_support(task.a, mixture, dim)
        if task.alpha == 0.0:
            return in_support(task.b, mixture, dim)
        return _support_id(task, dim) in {_support_id(f, dim) for f, w in mixture.items() if w > 0}
    if isinstance(task, Sine):
        return any(lo <= task.freq_lo and task.freq_hi <= hi for lo, hi in covered_bands(mixture))
    return _support_id(task, dim) in {_support_id(f, dim) for f, w in mixture.items() if w > 0}
