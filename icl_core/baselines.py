"""Classical in-context estimators (Garg et al.'s baselines) behind one interface.

Every estimator has a short `name` and `predict(xs, ys)`: xs (B, N, d), ys (B, N) -> (B, N), where entry i
predicts ys[:, i] at xs[:, i] from the first i examples only (position 0 sees none). Computation is batched,
runs on the device of xs, is done in float64 and returned in ys.dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

# Elements of float64 scratch per chunk (d x d Gram matrices of every prefix): bounds memory at ~64 MB.
CHUNK_ELEMENTS = 8 * 2**20
# The Lasso solver keeps two d x d matrices per prefix problem and sweeps them every step: chunks of 1M
# elements keep them in cache (measured 25-40% less CPU time than 8M at B=1280, N=41, d=20).
LASSO_CHUNK_ELEMENTS = 2**20


class Estimator(ABC):
    """Predicts every position of a batch of prompts from the examples before it."""

    name: ClassVar[str]

    def predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        """(B, N) predictions; entry i uses xs[:, :i], ys[:, :i] and the query xs[:, i]."""
        check_prompts(xs, ys)
        return self._predict(xs.to(torch.float64), ys.to(torch.float64)).to(ys.dtype)

    @abstractmethod
    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        """The float64 predictions."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def check_prompts(xs: Tensor, ys: Tensor) -> None:
    if xs.dim() != 3 or ys.dim() != 2 or xs.shape[:2] != ys.shape:
        raise ValueError(f"expected xs (B, N, d) and ys (B, N), got {tuple(xs.shape)} and {tuple(ys.shape)}")


def batch_chunks(batch: int, per_prompt: int, budget: int = CHUNK_ELEMENTS) -> list[slice]:
    """Slices of the batch so that each chunk holds at most `budget` elements of `per_prompt` each."""
    size = max(1, budget // max(1, per_prompt))
    return [slice(s, min(s + size, batch)) for s in range(0, batch, size)]


def prefix_sums(xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over the first i examples of x xᵀ (B, N, d, d) and of x y (B, N, d); zero at i = 0."""
    b, n, d = xs.shape
    gram = torch.zeros(b, n, d, d, dtype=xs.dtype, device=xs.device)
    xy = torch.zeros(b, n, d, dtype=xs.dtype, device=xs.device)
    if n > 1:
        gram[:, 1:] = torch.cumsum(xs[:, :-1, :, None] * xs[:, :-1, None, :], dim=1)
        xy[:, 1:] = torch.cumsum(xs[:, :-1] * ys[:, :-1, None], dim=1)
    return gram, xy


class ZeroPredictor(Estimator):
    """Always predicts 0 (normalized error 1 on the unit-variance families)."""

    name = "zero"

    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        return torch.zeros_like(ys)


class Averaging(Estimator):
    """w_hat = mean_j x_j y_j over the first i examples; predicts x_i · w_hat (0 at i = 0)."""

    name = "averaging"

    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        n = xs.shape[1]
        xy = torch.zeros_like(xs)
        if n > 1:
            xy[:, 1:] = torch.cumsum(xs[:, :-1] * ys[:, :-1, None], dim=1)
        count = torch.arange(n, dtype=xs.dtype, device=xs.device).clamp_min(1)
        return (xs * xy).sum(-1) / count


class LeastSquares(Estimator):
    """Minimum-norm least squares on the first i examples (0 at i = 0)."""

    name = "ols"

    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        out = torch.zeros_like(ys)
        for i in range(1, xs.shape[1]):
            x, y = xs[:, :i], ys[:, :i, None]
            if xs.device.type == "cpu":
                # gelsd: the SVD-based min-norm driver, ~1.5x faster than pinv. Not gelsy (torch's default):
                # on rank-deficient prompts (curriculum zero columns) it returned wrong, run-dependent answers.
                # CUDA has no min-norm lstsq driver, so there the pseudo-inverse.
                w = torch.linalg.lstsq(x, y, driver="gelsd").solution
            else:
                w = torch.linalg.pinv(x) @ y
            out[:, i] = (xs[:, i] * w[..., 0]).sum(-1)
        return out


class Ridge(Estimator):
    """argmin_w ||y - Xw||² + alpha ||w||² on the first i examples (sklearn's Ridge convention: no 1/n)."""

    name = "ridge"

    def __init__(self, alpha: float = 0.1):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        b, n, d = xs.shape
        out = torch.empty_like(ys)
        eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
        for sl in batch_chunks(b, n * d * d):
            gram, xy = prefix_sums(xs[sl], ys[sl])
            chol = torch.linalg.cholesky(gram + self.alpha * eye)
            w = torch.cholesky_solve(xy[..., None], chol)[..., 0]
            out[sl] = (xs[sl] * w).sum(-1)
        return out


class Lasso(Estimator):
    """argmin_w (1/(2n)) ||y - Xw||² + alpha ||w||₁ on the first n = i examples (sklearn's Lasso, no intercept).

    All prefixes of all prompts are solved at once in the Gram form (G = XᵀX/n, c = Xᵀy/n): an exact batched
    homotopy (the LARS-Lasso path from alpha_max down to alpha), then cyclic coordinate descent until no
    coordinate moves by `tol`, which polishes round-off and finishes any path cut at `max_path_steps`.
    """

    name = "lasso"

    def __init__(
        self, alpha: float = 0.01, tol: float = 1e-10, max_iter: int = 10_000, max_path_steps: int | None = None
    ):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.max_path_steps = max_path_steps  # default 4 d: a path has about min(n, d) joins plus few drops

    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        b, n, d = xs.shape
        out = torch.empty_like(ys)
        count = torch.arange(n, dtype=xs.dtype, device=xs.device).clamp_min(1)
        for sl in batch_chunks(b, n * d * d, LASSO_CHUNK_ELEMENTS):
            gram, xy = prefix_sums(xs[sl], ys[sl])
            gram = gram / count[:, None, None]
            xy = xy / count[:, None]
            w = self.solve(gram.reshape(-1, d, d), xy.reshape(-1, d))
            out[sl] = (xs[sl] * w.reshape(xy.shape)).sum(-1)
        return out

    def solve(self, gram: Tensor, c: Tensor) -> Tensor:
        """Minimize ½ wᵀGw - cᵀw + alpha ||w||₁ for each of P problems: gram (P, d, d), c (P, d) -> w (P, d)."""
        steps = 4 * c.shape[1] if self.max_path_steps is None else self.max_path_steps
        w = self._homotopy(gram, c, steps)
        return self._coordinate_descent(gram, c, w)

    def _homotopy(self, gram: Tensor, c: Tensor, max_steps: int) -> Tensor:
        # Along the path w_A(lam) = G_AA⁻¹ (c_A - lam s_A) is linear in lam, so each step jumps straight to the
        # next event: an inactive correlation r_j = (c - Gw)_j reaching ±lam (join) or an active w_j reaching
        # 0 (drop). `minv` is G_AA⁻¹ embedded in the identity, kept by a rank-one update at each event
        # (a batched Cholesky per step costs ~10x more on CPU).
        p, d = c.shape
        dev, dt = c.device, c.dtype
        w = torch.zeros_like(c)
        lam, first = c.abs().max(dim=1)
        idx = (lam > self.alpha).nonzero(as_tuple=True)[0]  # the others have w = 0
        gm, r, lam, first = gram[idx], c[idx].clone(), lam[idx], first[idx]
        m = idx.numel()
        rows = torch.arange(m, device=dev)
        diag = torch.diagonal(gm, dim1=1, dim2=2)
        act = torch.zeros(m, d, dtype=torch.bool, device=dev)
        act[rows, first] = True
        sgn = torch.zeros(m, d, dtype=dt, device=dev)
        sgn[rows, first] = torch.sign(r[rows, first])
        minv = torch.eye(d, dtype=dt, device=dev).repeat(m, 1, 1)
        minv[rows, first, first] = 1.0 / diag[rows, first]
        ww = torch.zeros(m, d, dtype=dt, device=dev)
        # The variable just dropped sits at r_j = s_j lam up to round-off: on the next step it must not re-join
        # at that same bound (it may at the opposite one). `dropped` holds s_j there, 0 elsewhere.
        dropped = torch.zeros(m, d, dtype=dt, device=dev)
        stopped = torch.zeros(m, dtype=torch.bool, device=dev)
        inf = torch.tensor(float("inf"), dtype=dt, device=dev)
        for step_no in range(max_steps):
            if m == 0:
                break
            if step_no % 8 == 0:
                # u = dw/d(-lam) = minv @ sgn (zero off the active set) follows each event by the same rank-one
                # update as minv; recomputing it now and then bounds the drift of the updates.
                u = (minv @ sgn[..., None])[..., 0] * act
            a = (gm @ u[..., None])[..., 0]  # r moves by -step * a; a_j = s_j on the active set
            lam_ = lam[:, None]
            floor = 1e-12 * lam_  # an event at step ~0 is the one just taken
            inactive = ~act & (diag > 0)
            up = (lam_ - r) / (1 - a)
            dn = (lam_ + r) / (1 + a)
            up = torch.where(inactive & (dropped <= 0) & (a < 1) & (up > floor), up, inf)
            dn = torch.where(inactive & (dropped >= 0) & (a > -1) & (dn > floor), dn, inf)
            jstep, jidx = torch.minimum(up, dn).min(dim=1)
            join_sign = torch.where(up[rows, jidx] <= dn[rows, jidx], 1.0, -1.0).to(dt)
            drop = torch.where(act & (u != 0), -ww / torch.where(u == 0, 1.0, u), inf)
            drop = torch.where(drop > floor, drop, inf)
            dstep, didx = drop.min(dim=1)
            end = torch.where(stopped, 0.0, lam - self.alpha)
            step = torch.minimum(end, torch.minimum(jstep, dstep))
            ww = ww + step[:, None] * u
            r = r - step[:, None] * a
            lam = lam - step
            stopped = stopped | (step >= end)
            is_join = ~stopped & (jstep <= dstep)
            is_drop = ~stopped & (jstep > dstep)
            j = torch.where(is_join, jidx, didx)
            # One rank-one update serves both events: bordering G_AA by column j (join) or removing row and
            # column j from its inverse (drop).
            # Column j of each symmetric matrix, read as row j: one contiguous row per problem.
            jrow = rows * d + j
            g = gm.view(m * d, d).index_select(0, jrow) * act
            q = (minv @ g[..., None])[..., 0]
            schur = diag[rows, j] - (g * q).sum(-1)
            col = minv.view(m * d, d).index_select(0, jrow)
            pivot = col[rows, j]
            u_j = u[rows, j]
            # A (numerically) singular G_AA: stop the path here and leave the problem to coordinate descent.
            singular = is_join & (schur <= 1e-12 * diag[rows, j])
            is_join = is_join & ~singular
            stopped = stopped | singular
            e = torch.zeros(m, d, dtype=dt, device=dev)
            e[rows, j] = 1.0
            vec = torch.where(is_join[:, None], q - e, col)
            coef = torch.where(is_join, 1.0 / torch.where(is_join, schur, 1.0), 0.0)
            coef = torch.where(is_drop, -1.0 / torch.where(is_drop, pivot, 1.0), coef)
            minv.baddbmm_((coef[:, None] * vec)[:, :, None], vec[:, None, :])
            # u after the event: join: u + v (qᵀs - s_j) / schur; drop: u - col u_j / pivot.
            u_coef = torch.where(is_join, coef * ((q * sgn).sum(-1) - join_sign), coef * u_j)
            u = u + u_coef[:, None] * vec
            minv[rows, j, j] += torch.where(is_join, -1.0, torch.where(is_drop, 1.0, 0.0)).to(dt)
            act[rows, j] = torch.where(is_join, True, torch.where(is_drop, False, act[rows, j]))
            dropped = torch.zeros_like(dropped)
            dropped[rows, j] = torch.where(is_drop, sgn[rows, j], 0.0)
            sgn[rows, j] = torch.where(is_join, join_sign, torch.where(is_drop, 0.0, sgn[rows, j]))
            u = u * act
            if bool(is_drop.any()):
                dr, dj = is_drop.nonzero(as_tuple=True)[0], j[is_drop]
                ww[dr, dj] = 0.0
                minv[dr, dj, :] = 0.0  # an exact identity row and column, not the round-off of the update
                minv[dr, :, dj] = 0.0
                minv[dr, dj, dj] = 1.0
            n_stopped = int(stopped.sum())
            if n_stopped > m // 4 or n_stopped == m:
                # Compaction copies every matrix: only worth it once enough problems have finished.
                w[idx[stopped]] = ww[stopped]
                keep = (~stopped).nonzero(as_tuple=True)[0]
                idx, gm, r, lam, diag = idx[keep], gm[keep], r[keep], lam[keep], diag[keep]
                act, sgn, minv, ww, dropped, u = act[keep], sgn[keep], minv[keep], ww[keep], dropped[keep], u[keep]
                stopped = stopped[keep]
                m = idx.numel()
                rows = rows[:m]
        w[idx] = ww
        return w

    def _coordinate_descent(self, gram: Tensor, c: Tensor, w: Tensor) -> Tensor:
        d = c.shape[1]
        w = w.clone()
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        zero_col = diag <= 0
        inv_diag = torch.where(zero_col, 0.0, 1.0 / torch.where(zero_col, 1.0, diag))
        cols = gram.transpose(1, 2).contiguous()  # columns of G as rows: the residual update reads them unstrided
        idx = torch.arange(c.shape[0], device=c.device)  # the problems still moving
        ww = w.clone()
        r = c - (gram @ w[..., None])[..., 0]
        for _ in range(self.max_iter):
            if idx.numel() == 0:
                break
            max_step = torch.zeros(idx.numel(), dtype=c.dtype, device=c.device)
            for j in range(d):
                old = ww[:, j]
                rho = r[:, j] + diag[:, j] * old
                new = torch.sign(rho) * torch.clamp(rho.abs() - self.alpha, min=0.0) * inv_diag[:, j]
                delta = new - old
                r.sub_(cols[:, j] * delta[:, None])
                ww[:, j] = new
                max_step = torch.maximum(max_step, delta.abs())
            moving = max_step >= self.tol
            n_moving = int(moving.sum())
            if n_moving == 0:
                break
            if n_moving > 0.75 * idx.numel():
                continue  # settled problems keep iterating until compaction pays for its copies
            w[idx] = ww
            keep = moving.nonzero(as_tuple=True)[0]
            idx, ww, r = idx[keep], ww[keep], r[keep]
            diag, inv_diag, cols = diag[keep], inv_diag[keep], cols[keep]
        w[idx] = ww
        return w


class NearestNeighbours(Estimator):
    """Mean of the ys of the k nearest (Euclidean) previous xs; fewer when fewer examples; 0 at i = 0."""

    name = "knn"

    def __init__(self, k: int = 3):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        self.k = int(k)

    def _predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        b, n, _ = xs.shape
        out = torch.zeros_like(ys)
        if n < 2:
            return out
        k = min(self.k, n - 1)
        for sl in batch_chunks(b, n * n):
            dist = torch.cdist(xs[sl], xs[sl])  # (b, query i, example j)
            later = torch.ones(n, n, dtype=torch.bool, device=xs.device).triu()  # j >= i is not yet seen
            dist = dist.masked_fill(later, float("inf"))
            near, pos = dist.topk(k, dim=-1, largest=False)
            valid = torch.isfinite(near)
            yj = torch.gather(ys[sl, None, :].expand(-1, n, -1), 2, pos) * valid
            out[sl] = yj.sum(-1) / valid.sum(-1).clamp_min(1)
        return out
