"""Bayes-optimal predictors: closed forms against explicit formulas, Monte Carlo against closed forms, and
optimality against the classical baselines on their own priors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from icl_core.baselines import Lasso, LeastSquares, NearestNeighbours, Ridge
from icl_core.bayes import (
    MC_NOISELESS_JITTER,
    NOISELESS_JITTER,
    SPARSE_ENUM_LIMIT,
    BayesPredictor,
    LinearBayes,
    MixtureBayes,
    MonteCarloBayes,
    SparseLinearBayes,
    bayes_posterior_mean,
)
from icl_core.families import Linear, Mixture, ReluNet, Sine, SparseLinear, build_mixture, sample_prompts

DENSE_SPARSE = build_mixture([{"family": "linear"}, {"family": "sparse_linear", "nnz": 2}])


def prompts(family, batch=16, n_points=10, dim=4, seed=0, noise_std=0.0):
    gen = torch.Generator().manual_seed(seed)
    xs, ys = sample_prompts(family, batch, n_points, dim, gen, noise_std=noise_std)
    return xs.double(), ys.double()


def sq_err(pred, ys):
    return (pred.double() - ys.double()) ** 2


@pytest.mark.parametrize(
    "family,dim",
    [(Linear(), 4), (SparseLinear(nnz=2), 4), (DENSE_SPARSE, 4), (Sine(), 1), (ReluNet(hidden=8), 2)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_shape_dtype_evidence_and_prefix_contract(family, dim):
    bayes = bayes_posterior_mean(family, noise_std=0.1, n_samples=300)
    assert bayes.name == "bayes"
    gen = torch.Generator().manual_seed(0)
    xs, ys = sample_prompts(family, 5, 9, dim, gen, noise_std=0.1)
    pred, log_ev = bayes.predict_with_evidence(xs, ys)
    assert pred.shape == ys.shape and pred.dtype == ys.dtype
    assert log_ev.shape == ys.shape and log_ev.dtype == torch.float64
    assert (log_ev[:, 0] == 0).all() and torch.isfinite(log_ev).all() and torch.isfinite(pred).all()
    torch.testing.assert_close(bayes.predict(xs, ys), pred)
    m = 4
    xs2, ys2 = xs.clone(), ys.clone()
    ys2[:, m:] += 1.0
    xs2[:, m + 1 :] = -xs2[:, m + 1 :]
    pred2, log_ev2 = bayes.predict_with_evidence(xs2, ys2)
    torch.testing.assert_close(pred2[:, : m + 1], pred[:, : m + 1])
    torch.testing.assert_close(log_ev2[:, : m + 1], log_ev[:, : m + 1])


def test_dispatch_jitter_and_sparse_fallback():
    assert isinstance(bayes_posterior_mean(Linear()), LinearBayes)
    assert isinstance(bayes_posterior_mean(SparseLinear(nnz=3)), SparseLinearBayes)
    assert isinstance(bayes_posterior_mean(Sine()), MonteCarloBayes)
    mix = bayes_posterior_mean(build_mixture([{"family": "linear"}, {"family": "sine"}]))
    assert isinstance(mix, MixtureBayes)
    # A mixture compares evidences under one noise model: the Monte-Carlo jitter once any component needs it.
    assert mix.noise_var(1) == MC_NOISELESS_JITTER
    assert bayes_posterior_mean(DENSE_SPARSE).noise_var(20) == NOISELESS_JITTER
    assert bayes_posterior_mean(Linear(), noise_std=0.3).noise_var(20) == pytest.approx(0.09)
    sparse = SparseLinearBayes(nnz=10, noise_std=0.2, n_samples=256, seed=3)
    assert math.comb(25, 10) > SPARSE_ENUM_LIMIT and sparse.uses_monte_carlo(25)
    assert not sparse.uses_monte_carlo(12)
    xs, ys = prompts(SparseLinear(nnz=10), batch=3, n_points=5, dim=25, noise_std=0.2)
    ref = MonteCarloBayes(SparseLinear(nnz=10), noise_std=0.2, n_samples=256, seed=3)
    for got, want in zip(sparse.predict_with_evidence(xs, ys), ref.predict_with_evidence(xs, ys)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        LinearBayes(noise_std=-1.0)


def test_dense_posterior_mean_is_ridge_and_evidence_is_the_gaussian_marginal():
    d, noise = 4, 0.3
    xs, ys = prompts(Linear(), batch=8, n_points=12, dim=d, noise_std=noise)
    pred, log_ev = LinearBayes(noise).predict_with_evidence(xs, ys)
    torch.testing.assert_close(pred, Ridge(alpha=noise**2 * d).predict(xs, ys), rtol=0, atol=1e-10)
    for i in range(1, 12):
        x = xs[:, :i]
        cov = x @ x.transpose(1, 2) / d + noise**2 * torch.eye(i, dtype=torch.float64)
        want = MultivariateNormal(torch.zeros(i, dtype=torch.float64), cov).log_prob(ys[:, :i])
        torch.testing.assert_close(log_ev[:, i], want, rtol=0, atol=1e-9)


def test_dense_noiseless_is_least_squares():
    xs, ys = prompts(Linear(), batch=32, n_points=12, dim=5)
    pred = LinearBayes().predict(xs, ys)
    torch.testing.assert_close(pred, LeastSquares().predict(xs, ys), rtol=0, atol=1e-5)


def _explicit_sparse(xs, ys, nnz, noise_var):
    """Posterior mean and evidence by brute force over supports, each with the explicit Gaussian marginal."""
    b, n, d = xs.shape
    preds, log_evs = torch.zeros(b, n, dtype=torch.float64), torch.zeros(b, n, dtype=torch.float64)
    supports = list(itertools.combinations(range(d), nnz))
    for i in range(n):
        lps, mus = [], []
        for sup in supports:
            x = xs[:, :i, list(sup)]
            if i == 0:
                lps.append(torch.zeros(b, dtype=torch.float64))
            else:
                cov = x @ x.transpose(1, 2) / nnz + noise_var * torch.eye(i, dtype=torch.float64)
                lps.append(MultivariateNormal(torch.zeros(i, dtype=torch.float64), cov).log_prob(ys[:, :i]))
            gram = x.transpose(1, 2) @ x + noise_var * nnz * torch.eye(nnz, dtype=torch.float64)
            w = torch.linalg.solve(gram, (x.transpose(1, 2) @ ys[:, :i, None]))[..., 0]
            mus.append((xs[:, i, list(sup)] * w).sum(-1))
        lp = torch.stack(lps)
        log_evs[:, i] = torch.logsumexp(lp, 0) - math.log(len(supports))
        preds[:, i] = (torch.softmax(lp, 0) * torch.stack(mus)).sum(0)
    return preds, log_evs


def test_sparse_enumeration_matches_brute_force():
    xs, ys = prompts(SparseLinear(nnz=2), batch=6, n_points=9, dim=5, noise_std=0.3)
    pred, log_ev = SparseLinearBayes(nnz=2, noise_std=0.3).predict_with_evidence(xs, ys)
    want_pred, want_ev = _explicit_sparse(xs, ys, 2, 0.09)
    torch.testing.assert_close(pred, want_pred, rtol=0, atol=1e-9)
    torch.testing.assert_close(log_ev, want_ev, rtol=0, atol=1e-9)


@pytest.mark.parametrize("noise_std", [0.0, 0.2])
def test_sparse_with_full_support_equals_dense(noise_std):
    # One support of all d coordinates is the dense prior: the per-support filter must match the Cholesky form.
    xs, ys = prompts(Linear(), batch=8, n_points=10, dim=3, noise_std=noise_std)
    pred, log_ev = SparseLinearBayes(nnz=3, noise_std=noise_std).predict_with_evidence(xs, ys)
    want_pred, want_ev = LinearBayes(noise_std).predict_with_evidence(xs, ys)
    # Noise-free, below d examples the jitter leaves XᵀX + 1e-10·d·I with condition ~1e10: ~1e-6 round-off in
    # both the prediction and the log evidence (which host's BLAS decides; up to 1.6e-6 seen on an AVX-512 host).
    atol = 1e-5 if noise_std == 0 else 1e-9
    torch.testing.assert_close(pred, want_pred, rtol=0, atol=atol)
    torch.testing.assert_close(log_ev, want_ev, rtol=1e-9, atol=max(atol, 1e-6))


def test_monte_carlo_converges_to_the_closed_form():
    d, noise = 2, 0.5
    xs, ys = prompts(Linear(), batch=48, n_points=8, dim=d, noise_std=noise)
    exact_pred, exact_ev = LinearBayes(noise).predict_with_evidence(xs, ys)
    pred_err, ev_err = [], []
    for n_samples in (100, 1_000, 10_000):
        pred, log_ev = MonteCarloBayes(Linear(), noise, n_samples=n_samples).predict_with_evidence(xs, ys)
        pred_err.append(((pred - exact_pred) ** 2).mean().item())
        ev_err.append((log_ev - exact_ev).abs().mean().item())
    assert pred_err[0] > pred_err[1] > pred_err[2] and pred_err[2] < 2e-3
    assert ev_err[0] > ev_err[1] > ev_err[2] and ev_err[2] < 0.05


def test_sparse_enumeration_agrees_with_monte_carlo():
    xs, ys = prompts(SparseLinear(nnz=1), batch=24, n_points=6, dim=3, noise_std=0.5)
    pred, log_ev = SparseLinearBayes(nnz=1, noise_std=0.5).predict_with_evidence(xs, ys)
    mc_pred, mc_ev = MonteCarloBayes(SparseLinear(nnz=1), 0.5, n_samples=20_000).predict_with_evidence(xs, ys)
    assert ((mc_pred - pred) ** 2).mean() < 1e-3
    assert (mc_ev - log_ev).abs().mean() < 0.05


def test_mixture_with_one_component_is_that_component():
    xs, ys = prompts(Linear(), batch=4, n_points=8, dim=3, noise_std=0.1)
    only_dense = bayes_posterior_mean(Mixture((Linear(), SparseLinear(nnz=2)), (1.0, 0.0)), noise_std=0.1)
    for got, want in zip(only_dense.predict_with_evidence(xs, ys), LinearBayes(0.1).predict_with_evidence(xs, ys)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", [Linear(), SparseLinear(nnz=2), DENSE_SPARSE], ids=lambda f: f.name)
def test_bayes_is_never_worse_than_the_baselines_on_its_own_prior(family):
    xs, ys = prompts(family, batch=400, n_points=17, dim=8, seed=7, noise_std=0.1)
    bayes = sq_err(bayes_posterior_mean(family, noise_std=0.1).predict(xs, ys), ys)
    for est in (LeastSquares(), Ridge(0.1), Lasso(0.01), NearestNeighbours(3)):
        diff = bayes - sq_err(est.predict(xs, ys), ys)  # paired, prompt by prompt, at every k
        mean, se = diff.mean(0), diff.std(0) / math.sqrt(diff.shape[0])
        assert (mean <= 4 * se + 1e-9).all(), f"{est.name}: {mean - 4 * se}"


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_mixture_bayes_selects_the_right_oracle(noise_std):
    d, nnz = 8, 2
    mixture = bayes_posterior_mean(DENSE_SPARSE, noise_std=noise_std)
    dense, sparse = LinearBayes(noise_std), SparseLinearBayes(nnz, noise_std)
    for family, oracle, other in ((Linear(), dense, sparse), (SparseLinear(nnz=nnz), sparse, dense)):
        xs, ys = prompts(family, batch=400, n_points=17, dim=d, seed=11, noise_std=noise_std)
        err_mix = sq_err(mixture.predict(xs, ys), ys).mean(0)
        err_oracle = sq_err(oracle.predict(xs, ys), ys).mean(0)
        err_other = sq_err(other.predict(xs, ys), ys).mean(0)
        # Close at every k while the family is still ambiguous, equal once the data identify it.
        assert ((err_mix - err_oracle).abs() <= 0.1).all()
        if noise_std == 0:
            assert ((err_mix - err_oracle)[nnz + 2 :].abs() <= 1e-6).all()
        else:
            gap = (err_mix - err_oracle)[d + 2 :].abs()
            assert (gap <= 0.15 * err_oracle[d + 2 :] + 1e-3).all()
        # ...and far from the wrong specialist.
        assert (err_mix[nnz + 2 : d] < 0.6 * err_other[nnz + 2 : d]).all()


def test_monte_carlo_learns_sinusoids_in_context():
    xs, ys = prompts(Sine(), batch=200, n_points=12, dim=1, seed=5)
    err = sq_err(bayes_posterior_mean(Sine(), n_samples=2048).predict(xs, ys), ys).mean(0)
    knn = sq_err(NearestNeighbours(3).predict(xs, ys), ys).mean(0)
    assert err[0] > 0.8 and err[6:].max() < 0.05
    assert (err[3:] < knn[3:]).all()


def test_bayes_predictors_are_estimators():
    for bayes in (LinearBayes(), SparseLinearBayes(2), MonteCarloBayes(Sine()), MixtureBayes([(LinearBayes(), 1.0)])):
        assert isinstance(bayes, BayesPredictor) and bayes.name == "bayes"
