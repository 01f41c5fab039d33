"""The estimators an evaluation compares, defined once: table name -> factory, kind, label and figure style.

Evaluation builds predictors from it, configs validate `eval.estimators` against it, and the maps and figures read
which estimators are classical and how each is drawn and named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .baselines import Averaging, Estimator, Lasso, LeastSquares, NearestNeighbours, Ridge, ZeroPredictor
from .bayes import bayes_posterior_mean
from .families import Family

# (eval task, pretraining prior or None, label noise std) -> the estimator, or None where it does not apply
Factory = Callable[[Family, Family | None, float], Estimator | None]


@dataclass(frozen=True)
class EstimatorSpec:
    """One row of the registry; `make` is None for the trained model, which the caller supplies."""

    name: str
    label: str
    classical: bool  # sees only the prompt, no prior: the candidates of `best_baseline`
    style: dict[str, Any] = field(default_factory=dict)  # matplotlib line keywords
    make: Factory | None = None


def _bayes_pretrain(task: Family, pretrain: Family | None, noise_std: float) -> Estimator | None:
    return None if pretrain is None else bayes_posterior_mean(pretrain, noise_std=noise_std)


# Ridge alpha 0.1 and Lasso alpha 0.01 (Garg et al.'s plotted value); kNN with k = 3.
REGISTRY: dict[str, EstimatorSpec] = {e.name: e for e in (
    EstimatorSpec("model", "transformer", False, dict(color="black", lw=2.4, zorder=5)),
    EstimatorSpec("zero", "zero", True, dict(color="#bcbd22", lw=1.4, ls=":"), lambda t, p, s: ZeroPredictor()),
    EstimatorSpec("averaging", "averaging", True, dict(color="#8c564b", lw=1.2, ls="-."),
                  lambda t, p, s: Averaging()),
    EstimatorSpec("ols", "least squares", True, dict(color="#1f77b4", lw=1.4), lambda t, p, s: LeastSquares()),
    EstimatorSpec("ridge", "ridge", True, dict(color="#17becf", lw=1.2, ls="--"), lambda t, p, s: Ridge(alpha=0.1)),
    EstimatorSpec("lasso", "lasso", True, dict(color="#2ca02c", lw=1.4), lambda t, p, s: Lasso(alpha=0.01)),
    EstimatorSpec("knn", "3-NN", True, dict(color="#e377c2", lw=1.2, ls="-."), lambda t, p, s: NearestNeighbours(k=3)),
    EstimatorSpec("bayes_pretrain", "Bayes (pretraining prior)", False, dict(color="#d62728", lw=1.4, ls="--"),
                  _bayes_pretrain),
    EstimatorSpec("bayes_task", "Bayes (test prior)", False, dict(color="#ff7f0e", lw=1.4, ls=":"),
                  lambda t, p, s: bayes_posterior_mean(t, noise_std=s)),
)}
ESTIMATORS = tuple(REGISTRY)  # the table names, in the order figures list them
CLASSICAL = tuple(name for name, e in REGISTRY.items() if e.classical)


def estimator_label(name: str) -> str:
    """How figures name an estimator (a name outside the registry, e.g. `best_baseline`, as it is)."""
    return REGISTRY[name].label if name in REGISTRY else name
