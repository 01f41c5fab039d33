"""Bayes-optimal in-context predictors: the posterior mean E[f(x_i) | first i examples] under a known prior.

Observations are y = f(x) + eps, eps ~ N(0, noise_std²). Every predictor follows the `Estimator` interface
of `icl_core.baselines` and also gives the log marginal likelihood (evidence) of the examples it has seen,
which is what a mixture prior weighs its components by. Priors are taken over the full input dimension
d = xs.shape[-1] (the evaluation setting; curriculum-inactive coordinates are not modelled).

Noise-free data (noise_std = 0) makes the posterior degenerate, so a small jitter variance stands in:
`NOISELESS_JITTER` for the closed forms, the larger `MC_NOISELESS_JITTER` for Monte Carlo.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from icl_core.baselines import Estimator, batch_chunks, check_prompts, prefix_sums
from icl_core.families import Family, Linear, Mixture, SparseLinear

# Noise variance assumed for noise-free data by the closed forms. Small enough that the dense posterior
# mean is least squares to ~1e-9 in squared error right at k = d (1e-6 left a visible 1e-4 bump there);
# large enough that float64 factorizations of XᵀX + 1e-10·d·I (condition <= ~1e11) keep round-off near
# 1e-6, and well above the ~1e-13 variance of float32 rounding in ys, so a true model is not penalized
# for rounding.
NOISELESS_JITTER = 1e-10
# Noise variance assumed for noise-free data by Monte Carlo: finitely many prior samples never fit
# noise-free data exactly, and with a tiny variance the importance weights collapse onto the single
# closest sample. Noise std 0.1 tempers the likelihood so that many samples keep weight.
MC_NOISELESS_JITTER = 1e-2
# Enumerate sparse supports exactly while C(d, nnz) is at most this (C(20, 3) = 1140, C(20, 4) = 4845);
# beyond it the cost (linear in the count) is out of proportion and Monte Carlo is used instead.
SPARSE_ENUM_LIMIT = 5000
# Prior samples drawn by the Monte-Carlo predictor unless told otherwise (cost is linear in it).
DEFAULT_MC_SAMPLES = 8192
# Prior samples drawn per generator call: fixing it makes the sample set depend only on (n_samples, seed).
MC_SAMPLE_CHUNK = 1024
# Float64 elements per working array: keeps the per-step arrays of the support enumeration in cache and
# bounds the Monte-Carlo function evaluations (samples x prompts x points x d) to a few tens of MB.
ENUM_CHUNK = 2**15
MC_CHUNK = 2**21

_LOG_2PI = math.log(2 * math.pi)


class BayesPredictor(Estimator):
    """Posterior-mean predictor for a prior; `predict_with_evidence` also returns log p(y_1..y_i | x_1..x_i)."""

    name = "bayes"

    def __init__(self, noise_std: float = 0.0):
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)

    def uses_monte_carlo(self, dim: int) -> bool:
        """Whether the predictor falls back to Monte Carlo at input dimension `dim`."""
        return False

    def noise_var(self, dim: int) -> float:
        """The observation-noise variance assumed: noise_std², or the jitter when noise_std = 0."""
        if self.noise_std > 0:
            return self.noise_std**2
        return MC_NOISELESS_JITTER if self.uses_monte_carlo(dim) else NOISELESS_JITTER

    def predict_with_evidence(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        """(predictions in ys.dtype, log evidence in float64), both (B, N); log evidence is 0 at i = 0.

        The log evidence stays in float64: it reaches large magnitudes and only its differences matter.
        """
        check_prompts(xs, ys)
        pred, log_ev = self.posterior(xs.to(torch.float64), ys.to(torch.float64), self.noise_var(xs.shape[-1]))
        return pred.to(ys.dtype), log_ev

    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        return self.posterior(xs, ys, self.noise_var(xs.shape[-1]))[0]

    @abstractmethod
    def posterior(self, xs: Tensor, ys: Tensor, noise_var: float) -> tuple[Tensor, Tensor]:
        """Float64 posterior means and log evidences (B, N) under observation-noise variance `noise_var`."""


def _exclusive_cumsum(t: Tensor) -> Tensor:
    """out[..., i] = sum of t[..., :i] (0 at i = 0)."""
    out = torch.zeros_like(t)
    out[..., 1:] = torch.cumsum(t[..., :-1], dim=-1)
    return out


def _gauss_logpdf(resid: Tensor, var: Tensor | float) -> Tensor:
    var = torch.as_tensor(var, dtype=resid.dtype, device=resid.device)
    return -0.5 * (_LOG_2PI + torch.log(var) + resid**2 / var)


def _merge(lse: Tensor, mean: Tensor, lse_new: Tensor, mean_new: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two weighted means whose total log weights are lse and lse_new."""
    total = torch.logaddexp(lse, lse_new)
    first = torch.where(torch.isneginf(lse), 0.0, torch.exp(lse - total))
    return total, first * mean + torch.exp(lse_new - total) * mean_new


def _weighted(log_w: Tensor, values: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(logsumexp of log_w, mean of values weighted by exp(log_w)) along `dim`."""
    top = log_w.amax(dim=dim, keepdim=True)
    # Clamped above exp's underflow, where it turns slow (noise-free log evidences differ by up to ~1e10).
    w = torch.exp((log_w - top).clamp_(min=-700.0))
    total = w.sum(dim=dim)
    return top.squeeze(dim) + torch.log(total), (w * values).sum(dim=dim) / total


class LinearBayes(BayesPredictor):
    """Dense linear prior w ~ N(0, I_d / d): the Gaussian posterior mean, i.e. ridge with alpha = noise_var · d."""

    def posterior(self, xs: Tensor, ys: Tensor, noise_var: float) -> tuple[Tensor, Tensor]:
        b, n, d = xs.shape
        pred = torch.empty_like(ys)
        logp = torch.empty_like(ys)
        eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
        for sl in batch_chunks(b, n * d * d):
            gram, xy = prefix_sums(xs[sl], ys[sl])
            # Posterior covariance noise_var · M⁻¹ with M = XᵀX + (noise_var / prior_var) I, mean M⁻¹Xᵀy.
            chol = torch.linalg.cholesky(gram + (noise_var * d) * eye)
            sol = torch.cholesky_solve(torch.stack([xy, xs[sl]], dim=-1), chol)
            pred[sl] = (xs[sl] * sol[..., 0]).sum(-1)
            pvar = noise_var * (1.0 + (xs[sl] * sol[..., 1]).sum(-1))
            logp[sl] = _gauss_logpdf(ys[sl] - pred[sl], pvar)
        # Chain rule: log p(y_1..y_i) = sum_{j<i} log p(y_j | y_<j), without the cancellation of the direct form.
        return pred, _exclusive_cumsum(logp)


class SparseLinearBayes(BayesPredictor):
    """Sparse linear prior: a uniform support of nnz coordinates, non-zeros ~ N(0, 1/nnz).

    Exact: a posterior-weighted average over all C(d, nnz) supports of each support's Gaussian posterior
    mean. Beyond `SPARSE_ENUM_LIMIT` supports it falls back to Monte Carlo with prior samples.
    """

    def __init__(self, nnz: int, noise_std: float = 0.0, n_samples: int = DEFAULT_MC_SAMPLES, seed: int = 0):
        super().__init__(noise_std)
        if nnz < 1:
            raise ValueError(f"nnz must be >= 1, got {nnz!r}")
        self.nnz = int(nnz)
        self.n_samples = int(n_samples)
        self.seed = int(seed)

    def uses_monte_carlo(self, dim: int) -> bool:
        return math.comb(dim, min(self.nnz, dim)) > SPARSE_ENUM_LIMIT

    def posterior(self, xs: Tensor, ys: Tensor, noise_var: float) -> tuple[Tensor, Tensor]:
        d = xs.shape[-1]
        if self.uses_monte_carlo(d):
            mc = MonteCarloBayes(SparseLinear(nnz=self.nnz), self.noise_std, self.n_samples, self.seed)
            return mc.posterior(xs, ys, noise_var)
        return _enumerate_supports(xs, ys, min(self.nnz, d), noise_var)


def _enumerate_supports(xs: Tensor, ys: Tensor, s: int, noise_var: float) -> tuple[Tensor, Tensor]:
    # One Kalman filter (recursive Bayesian linear regression on x_S) per prompt and support, run over the
    # positions; each s x s covariance entry is its own (prompts x supports) array, so every step is a few
    # dozen elementwise ops on cache-sized arrays instead of millions of tiny matrix factorizations.
    b, n, d = xs.shape
    supports = torch.combinations(torch.arange(d, device=xs.device), r=s)  # (C, s)
    n_sup = supports.shape[0]
    prior_var = 1.0 / s
    lse = torch.full((b, n), -math.inf, dtype=xs.dtype, device=xs.device)
    mean = torch.zeros_like(ys)
    b_chunk = max(1, min(b, ENUM_CHUNK // min(n_sup, 64)))
    c_chunk = max(1, ENUM_CHUNK // b_chunk)
    for b0 in range(0, b, b_chunk):
        bs = slice(b0, min(b0 + b_chunk, b))
        # Layout (points, coordinates, prompts): gathering supports copies whole rows of prompts.
        xt = xs[bs].permute(1, 2, 0).contiguous()
        yt = ys[bs].t().contiguous()
        nb = yt.shape[1]
        for c0 in range(0, n_sup, c_chunk):
            sup = supports[c0 : c0 + c_chunk]
            shape = (sup.shape[0], nb)  # (supports, prompts)
            m = [xs.new_zeros(shape) for _ in range(s)]
            cov = [[xs.new_full(shape, prior_var if k == l else 0.0) for l in range(k + 1)] for k in range(s)]
            log_ev = xs.new_zeros(shape)
            lse_c = xs.new_empty(nb, n)
            mean_c = xs.new_empty(nb, n)
            for j in range(n):
                x = [xt[j].index_select(0, sup[:, k]) for k in range(s)]  # x_S: s arrays (supports, prompts)
                mu = x[0] * m[0]
                for k in range(1, s):
                    mu.addcmul_(x[k], m[k])
                px = []  # cov @ x
                for k in range(s):
                    acc = cov[k][0] * x[0]
                    for l in range(1, s):
                        acc.addcmul_(cov[k][l] if l <= k else cov[l][k], x[l])
                    px.append(acc)
                pvar = x[0] * px[0]
                for k in range(1, s):
                    pvar.addcmul_(x[k], px[k])
                pvar += noise_var
                lse_c[:, j], mean_c[:, j] = _weighted(log_ev, mu, dim=0)
                resid = yt[j] - mu
                log_ev += _gauss_logpdf(resid, pvar)
                for k in range(s):
                    gain = px[k] / pvar
                    m[k].addcmul_(gain, resid)
                    for l in range(k + 1):
                        cov[k][l].addcmul_(gain, px[l], value=-1.0)
            lse[bs], mean[bs] = _merge(lse[bs], mean[bs], lse_c, mean_c)
    # The uniform prior over supports: evidence is the mean, not the sum, of the per-support evidences.
    return mean, lse - math.log(n_sup)


class MonteCarloBayes(BayesPredictor):
    """Any prior: self-normalized importance weighting of `n_samples` prior draws by their likelihood.

    Evidence is the log of the mean likelihood. Samples come from a `torch.Generator` seeded with `seed`,
    so the predictor is deterministic.
    """

    def __init__(self, prior: Family, noise_std: float = 0.0, n_samples: int = DEFAULT_MC_SAMPLES, seed: int = 0):
        super().__init__(noise_std)
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples!r}")
        self.prior = prior
        self.n_samples = int(n_samples)
        self.seed = int(seed)

    def uses_monte_carlo(self, dim: int) -> bool:
        return True

    def posterior(self, xs: Tensor, ys: Tensor, noise_var: float) -> tuple[Tensor, Tensor]:
        b, n, d = xs.shape
        gen = torch.Generator(device=xs.device).manual_seed(self.seed)
        lse = torch.full((b, n), -math.inf, dtype=xs.dtype, device=xs.device)
        mean = torch.zeros_like(ys)
        for s0 in range(0, self.n_samples, MC_SAMPLE_CHUNK):
            n_s = min(MC_SAMPLE_CHUNK, self.n_samples - s0)
            fns = self.prior.sample(n_s, d, gen)
            for sl in batch_chunks(b, n_s * n * d, MC_CHUNK):
                xb = xs[sl].reshape(1, -1, d).expand(n_s, -1, -1)
                f = fns(xb).to(xs.dtype).reshape(n_s, -1, n)  # (samples, prompts, points)
                log_lik = _exclusive_cumsum(_gauss_logpdf(ys[sl] - f, noise_var))
                lse_c, mean_c = _weighted(log_lik, f, dim=0)
                lse[sl], mean[sl] = _merge(lse[sl], mean[sl], lse_c, mean_c)
        return mean, lse - math.log(self.n_samples)


class MixtureBayes(BayesPredictor):
    """Mixture prior: components' posterior means weighted by mixture weight x evidence (the model-selection oracle).

    With noise_std = 0 all components assume the same jitter variance (the Monte-Carlo one if any component
    needs it), so that their evidences are comparable.
    """

    def __init__(self, components: Sequence[tuple[BayesPredictor, float]], noise_std: float = 0.0):
        super().__init__(noise_std)
        self.components = [(c, float(w)) for c, w in components if w > 0]
        if not self.components:
            raise ValueError("a mixture needs a component with positive weight")

    def uses_monte_carlo(self, dim: int) -> bool:
        return any(c.uses_monte_carlo(dim) for c, _ in self.components)

    def posterior(self, xs: Tensor, ys: Tensor, noise_var: float) -> tuple[Tensor, Tensor]:
        preds, log_ws = [], []
        for comp, weight in self.components:
            pred, log_ev = comp.posterior(xs, ys, noise_var)
            preds.append(pred)
            log_ws.append(log_ev + math.log(weight))
        log_ev, pred = _weighted(torch.stack(log_ws), torch.stack(preds), dim=0)
        return pred, log_ev


def bayes_posterior_mean(
    prior: Family, noise_std: float = 0.0, n_samples: int = DEFAULT_MC_SAMPLES, seed: int = 0
) -> BayesPredictor:
    """The Bayes-optimal predictor for `prior`: closed form where there is one, Monte Carlo otherwise."""
    if isinstance(prior, Linear):
        return LinearBayes(noise_std)
    if isinstance(prior, SparseLinear):
        return SparseLinearBayes(prior.nnz, noise_std, n_samples, seed)
    if isinstance(prior, Mixture):
        parts = [(bayes_posterior_mean(c, noise_std, n_samples, seed + i), w) for i, (c, w) in enumerate(prior.items())]
        return MixtureBayes(parts, noise_std)
    return MonteCarloBayes(prior, noise_std, n_samples, seed)
