"""Where a perfect learner stands in finding 2's window, from the estimators alone (no model is trained).

For pretraining on 0.5 sparse_linear(nnz=s) + 0.5 dense linear and test prompts at intermediate nnz, prints the
error (mean over k = 1 ... d-1) of Lasso, least squares and the Bayes predictor for the pretraining prior, and that
predictor's position (bayes - lasso) / (ols - lasso): 0 at Lasso, 1 at least squares. docs/reproduction.md quotes it.

    python docs/interpolation_window.py
"""

from __future__ import annotations

import numpy as np

from icl_core.evaluate import estimator_predictors, evaluate_predictors
from icl_core.families import family_from_id

SETTINGS = [(5, 1), (8, 1), (10, 2), (20, 2)]  # (d, pretraining nnz): the CPU twin's, larger ones, the paper's
ESTIMATORS = ("lasso", "ols", "bayes_pretrain")


def main() -> None:
    for d, nnz in SETTINGS:
        pretrain = family_from_id(f"mixture(0.5*sparse_linear(nnz={nnz})+0.5*linear)")
        tasks = [family_from_id(f"sparse_linear(nnz={n})") for n in range(nnz + 1, min(d, nnz + 6))]
        rows = evaluate_predictors({}, tasks, dim=d, n_points=2 * d + 1, n_prompts=1280,
                                   make_predictors=lambda t, p=pretrain: estimator_predictors(ESTIMATORS, t, p, 0.0))
        print(f"d = {d}, {2 * d + 1} points, pretrained on {pretrain.canonical_id}:")
        for t in tasks:
            m = {e: float(np.mean([r.error for r in rows if r.task == t.canonical_id and r.estimator == e
                                   and 1 <= r.k <= d - 1])) for e in ESTIMATORS}
            position = (m["bayes_pretrain"] - m["lasso"]) / (m["ols"] - m["lasso"])
            print(f"  {t.canonical_id}: lasso {m['lasso']:.3f}  ols {m['ols']:.3f}  "
                  f"bayes_pretrain {m['bayes_pretrain']:.3f}  position {position:+.2f}")


if __name__ == "__main__":
    main()
