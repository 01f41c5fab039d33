"""Classical baselines: the prefix contract, and agreement with scikit-learn and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso as SkLasso
from sklearn.linear_model import Ridge as SkRidge

from icl_core.baselines import (
    Averaging,
    Estimator,
    Lasso,
    LeastSquares,
    NearestNeighbours,
    Ridge,
    ZeroPredictor,
)
from icl_core.estimators import CLASSICAL, REGISTRY, estimator_label
from icl_core.families import Linear, SparseLinear, sample_prompts


def prompts(family=None, batch=16, n_points=12, dim=5, seed=0, noise_std=0.0, active_dim=None):
    gen = torch.Generator().manual_seed(seed)
    return sample_prompts(family or Linear(), batch, n_points, dim, gen, noise_std=noise_std, active_dim=active_dim)


ALL = [ZeroPredictor(), Averaging(), LeastSquares(), Ridge(0.1), Lasso(0.01), NearestNeighbours(3)]


@pytest.mark.parametrize("est", ALL, ids=lambda e: e.name)
def test_shape_dtype_and_prefix_contract(est: Estimator):
    xs, ys = prompts(batch=6, n_points=10, dim=4, noise_std=0.1)
    out = est.predict(xs, ys)
    assert out.shape == ys.shape and out.dtype == ys.dtype
    assert torch.isfinite(out).all()
    assert (out[:, 0] == 0).all()  # no examples yet
    # Position i reads x_1..x_i, y_1..y_{i-1}: changing later ys, or xs after i, leaves it unchanged.
    m = 5
    xs2, ys2 = xs.clone(), ys.clone()
    ys2[:, m:] = torch.randn(ys2[:, m:].shape)
    xs2[:, m + 1 :] = torch.randn(xs2[:, m + 1 :].shape)
    out2 = est.predict(xs2, ys2)
    torch.testing.assert_close(out2[:, : m + 1], out[:, : m + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out2[:, m + 1 :], out[:, m + 1 :]) or est.name == "zero"


@pytest.mark.parametrize("est", ALL, ids=lambda e: e.name)
def test_float64_in_float64_out_and_names(est: Estimator):
    xs, ys = prompts(batch=3, n_points=6, dim=3)
    assert est.predict(xs.double(), ys.double()).dtype == torch.float64
    # the registry builds each baseline under its own name, as a classical estimator
    spec = REGISTRY[est.name]
    assert spec.classical and type(spec.make(Linear(), None, 0.0)) is type(est)


def test_registry_defines_each_estimator_once_with_its_label_and_style():
    assert set(CLASSICAL) == {"zero", "averaging", "ols", "ridge", "lasso", "knn"}
    assert REGISTRY["model"].make is None and REGISTRY["bayes_pretrain"].make(Linear(), None, 0.0) is None
    assert REGISTRY["bayes_pretrain"].make(Linear(), SparseLinear(nnz=1), 0.0) is not None
    labels = [spec.label for spec in REGISTRY.values()]
    assert len(set(labels)) == len(labels) and all(spec.style.get("color") for spec in REGISTRY.values())
    assert estimator_label("ols") == "least squares" and estimator_label("best_baseline") == "best_baseline"


def test_zero_predictor_has_unit_normalized_error():
    xs, ys = prompts(batch=2000, n_points=5, dim=8)
    err = ((ZeroPredictor().predict(xs, ys) - ys) ** 2).mean()
    assert abs(err.item() - 1.0) < 0.05


def test_least_squares_is_exact_from_d_examples_and_min_norm_below():
    d = 5
    xs, ys = prompts(batch=32, n_points=12, dim=d)
    pred = LeastSquares().predict(xs.double(), ys.double())
    err = ((pred - ys.double()) ** 2).mean(0)
    assert err[d:].max() < 1e-10
    assert err[1:d].min() > 1e-3
    x, y = xs.double().numpy(), ys.double().numpy()
    for b in range(4):
        for i in range(1, d):
            w = np.linalg.lstsq(x[b, :i], y[b, :i], rcond=None)[0]  # gelsd: the minimum-norm solution
            assert abs(x[b, i] @ w - pred[b, i].item()) < 1e-8


def test_least_squares_is_min_norm_on_rank_deficient_prompts():
    # Curriculum prompts: the last two coordinates are zero, so X never has full column rank.
    xs, ys = prompts(batch=4, n_points=9, dim=5, noise_std=0.1, active_dim=3)
    pred = LeastSquares().predict(xs.double(), ys.double())
    x, y = xs.double().numpy(), ys.double().numpy()
    for b in range(4):
        for i in range(1, 9):
            w = np.linalg.lstsq(x[b, :i], y[b, :i], rcond=None)[0]
            assert abs(x[b, i] @ w - pred[b, i].item()) < 1e-8


def test_averaging_matches_its_formula():
    xs, ys = prompts(batch=4, n_points=8, dim=3)
    pred = Averaging().predict(xs.double(), ys.double())
    x, y = xs.double(), ys.double()
    for i in range(1, 8):
        w = (x[:, :i] * y[:, :i, None]).mean(1)
        torch.testing.assert_close(pred[:, i], (x[:, i] * w).sum(-1))


def test_ridge_matches_sklearn():
    xs, ys = prompts(batch=4, n_points=10, dim=6, noise_std=0.2)
    pred = Ridge(alpha=0.3).predict(xs.double(), ys.double())
    x, y = xs.double().numpy(), ys.double().numpy()
    for b in range(4):
        for i in range(1, 10):
            ref = SkRidge(alpha=0.3, fit_intercept=False, solver="cholesky").fit(x[b, :i], y[b, :i])
            assert abs(ref.predict(x[b, i : i + 1])[0] - pred[b, i].item()) < 1e-9


def _sklearn_lasso(xs, ys, alpha):
    x, y = xs.double().numpy(), ys.double().numpy()
    out = np.zeros(y.shape)
    for b in range(x.shape[0]):
        for i in range(1, x.shape[1]):
            ref = SkLasso(alpha=alpha, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(x[b, :i], y[b, :i])
            out[b, i] = ref.predict(x[b, i : i + 1])[0]
    return out


@pytest.mark.parametrize(
    "family,noise_std,active_dim",
    [(SparseLinear(nnz=3), 0.1, None), (SparseLinear(nnz=3), 0.0, None), (Linear(), 0.1, None), (Linear(), 0.0, 7)],
    ids=["sparse-noisy", "sparse-noiseless", "dense-noisy", "dense-zero-columns"],
)
def test_lasso_matches_sklearn_prefix_by_prefix(family, noise_std, active_dim):
    xs, ys = prompts(family, batch=6, n_points=21, dim=10, seed=3, noise_std=noise_std, active_dim=active_dim)
    pred = Lasso(alpha=0.01).predict(xs.double(), ys.double()).numpy()
    ref = _sklearn_lasso(xs, ys, 0.01)
    assert np.abs(pred - ref).max() < 1e-4


def test_lasso_large_alpha_gives_zero_and_small_path_is_exact():
    xs, ys = prompts(SparseLinear(nnz=2), batch=4, n_points=9, dim=6, seed=1, noise_std=0.1)
    assert (Lasso(alpha=100.0).predict(xs, ys) == 0).all()
    pred = Lasso(alpha=0.2, max_path_steps=0).predict(xs.double(), ys.double()).numpy()  # coordinate descent only
    assert np.abs(pred - _sklearn_lasso(xs, ys, 0.2)).max() < 1e-4


def test_knn_matches_brute_force():
    xs, ys = prompts(batch=5, n_points=9, dim=3, noise_std=0.1)
    pred = NearestNeighbours(k=3).predict(xs, ys)
    for b in range(5):
        for i in range(1, 9):
            dist = [(torch.linalg.norm(xs[b, j] - xs[b, i]).item(), ys[b, j].item()) for j in range(i)]
            near = sorted(dist)[:3]
            assert abs(pred[b, i].item() - sum(y for _, y in near) / len(near)) < 1e-5


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError):
        Ridge(alpha=0.0)
    with pytest.raises(ValueError):
        Lasso(alpha=-1.0)
    with pytest.raises(ValueError):
        NearestNeighbours(k=0)
    with pytest.raises(ValueError):
        ZeroPredictor().predict(torch.zeros(2, 3), torch.zeros(2, 3))
