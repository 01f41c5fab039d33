"""The finding a sweep exists to show, with its thresholds: the `checks:` section of a sweep file.

Validated with the rest of the sweep file (before anything launches); evaluated on the finished sweep by
`iclmix analyze check`. Each finding is one model, chosen by `finding:`. Errors are the normalized
squared errors of the eval (zero predictor = 1); "mean over k" is over the k named by each check.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from icl_core.errors import ConfigError, Strict, from_validation_error


class _Check(Strict):
    @field_validator("k", "position", mode="before", check_fields=False)
    @classmethod
    def _pair(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # YAML has lists, not tuples


class ModelSelection(_Check):
    """Finding 1: at mixture weight `weight` (of family_a; family_b has the rest) the model is, at every k,
    within max(rel_tol x specialist, abs_tol) of each family's specialist (the model pretrained on that
    family alone) and within max(bayes_rel_tol x bayes_pretrain, abs_tol) of its own mixture's Bayes predictor."""

    finding: Literal["model_selection"]
    family_a: str
    family_b: str
    weight: float = Field(0.5, gt=0, lt=1)
    rel_tol: float = Field(0.15, ge=0)
    abs_tol: float = Field(0.02, ge=0)
    bayes_rel_tol: float = Field(0.20, ge=0)


class Interpolation(_Check):
    """Finding 2: pretrained on `mixture`, on sparse tasks of intermediate nnz the model's error (mean over k in
    `k`, default 1 … d−1) lies between the `low` and `high` estimators' errors: its position
    (model − low) / (high − low) is inside `position`."""

    finding: Literal["interpolation"]
    mixture: str
    test_nnz: list[int] = Field(min_length=1)
    low: str = "lasso"
    high: str = "ols"
    k: tuple[int, int] | None = None
    position: tuple[float, float] = (0.0, 1.0)

    @field_validator("k")
    @classmethod
    def _k_range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError("must be an increasing range of k >= 0")
        return v

    @field_validator("position")
    @classmethod
    def _position_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError("must be an increasing range")
        return v


class ConvexCombination(_Check):
    """Finding 3: on convex combinations α·a + (1−α)·b the model's excess error over `reference` (mean over
    k ≥ 1) is at most `edge_max_excess` at `edge_alphas` and peaks at an intermediate α, at least
    `peak_ratio` times the largest edge excess."""

    finding: Literal["convex_combination"]
    mixture: str | None = None  # default: the sweep's only pretraining mixture
    reference: str = "bayes_task"
    edge_alphas: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=1)
    edge_max_excess: float = Field(0.1, ge=0)
    peak_ratio: float = Field(2.0, gt=0)


class FrequencyExtremes(_Check):
    """Finding 4: pretrained on `mixture`, the model's error (mean over k ≥ 1) on sine tasks at the `extremes`
    frequencies (default: the lowest and highest test frequency outside the band) is at least `min_ratio`
    times its mean error on the test frequencies inside the band."""

    finding: Literal["frequency_extremes"]
    mixture: str
    extremes: list[float] | None = None
    min_ratio: float = Field(3.0, gt=0)


class Coverage(_Check):
    """The coverage map shows models that learned: for every pretraining mixture, the model's excess error over
    `reference` (mean over k >= 1 and seeds) is at most `max_excess` on each eval task inside the mixture's
    support, and at least `outside_min_excess` on each task in `outside` (tasks outside every mixture)."""

    finding: Literal["coverage"]
    reference: str = "bayes_task"
    max_excess: float = Field(0.1, ge=0)
    outside: list[str] = Field(min_length=1)
    outside_min_excess: float = Field(0.2, ge=0)


FINDINGS: dict[str, type[_Check]] = {
    "model_selection": ModelSelection,
    "interpolation": Interpolation,
    "convex_combination": ConvexCombination,
    "frequency_extremes": FrequencyExtremes,
    "coverage": Coverage,
}
Check = ModelSelection | Interpolation | ConvexCombination | FrequencyExtremes | Coverage


def validate_checks(data: Any) -> Check | None:
    """The validated check of a `checks:` mapping (None when empty)."""
    if not data:
        return None
    if not isinstance(data, dict):
        raise ConfigError("", "must be a mapping with a `finding:` key")
    finding = data.get("finding")
    if finding not in FINDINGS:
        raise ConfigError("finding", f"must be one of {', '.join(FINDINGS)} (got {finding!r})")
    try:
        return FINDINGS[finding].model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
