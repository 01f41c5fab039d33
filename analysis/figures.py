"""Figures (matplotlib's object API with the Agg canvas, no pyplot state): each is written as PNG and SVG."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from icl_core.estimators import ESTIMATORS, REGISTRY, estimator_label

from .maps import CoverageMap

AXIS_LABEL = {
    "nnz": "test sparsity (nnz; dense = d)",
    "freq": "test frequency ω",
    "alpha": "test α (weight of the first family in the convex combination)",
    "task": "eval task",
    "nnz_set": "pretraining: covered nnz levels",
    "freq_band": "pretraining: covered frequency band",
    "mixture": "pretraining mixture",
    "cell_label": "sweep cell",
}


DPI = 130  # PNG resolution; `--dpi` on the analyze commands sets it


def save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write `stem`.png (at DPI) and `stem`.svg into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=DPI, bbox_inches="tight", facecolor="white")
    fig.savefig(paths[1], bbox_inches="tight", facecolor="white")
    return paths


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_")[:80] or "x"


def heatmap_stem(m: CoverageMap) -> str:
    """The file name of a map, saying what it is; the CLI and the report write one map to one file."""
    stem = f"heatmap_{slug(m.coverage)}_{slug(m.test_axis)}_k{m.k}"
    if m.relative_to is None:
        return stem
    return stem + (f"_ratio_vs_{m.relative_to}" if m.mode == "ratio" else f"_vs_{m.relative_to}")


def curves_stem(coverage: str, value: Any) -> str:
    """The file name of the ICL curves of the trials at one coverage value."""
    if isinstance(value, str):
        text = value[len("mixture("):-1] if value.startswith("mixture(") else value
    else:
        text = short_label(value)
    return f"curves_{slug(coverage)}_{slug(text)}"


def family_label(family_id: str) -> str:
    """A family or mixture id as a person reads it (each family's own `label`), or the text as it is."""
    from icl_core.families import family_from_id

    try:
        return family_from_id(family_id).label()
    except (ValueError, TypeError, KeyError):  # ConfigError is a ValueError
        return family_id


def short_label(value: Any) -> str:
    """Readable tick labels: families and mixtures by their labels (`0.5 linear + 0.5 sparse linear (1
    non-zero)`), numbers with :g."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    if isinstance(value, (int, np.integer)):
        return str(value)
    text = str(value)
    return family_label(text) if re.match(r"[a-z_]+(\(|$)", text) else text


def axis_label(axis: str) -> str:
    if axis.startswith("weight:"):
        return f"pretraining weight of {family_label(axis[7:])}"
    return AXIS_LABEL.get(axis, axis)


def value_label(m: CoverageMap) -> str:
    """What a map's cells are, in words (estimators by their figure labels)."""
    kk = "mean over k ≥ 1" if m.k == "all" else f"k = {m.k}"
    ref = estimator_label(m.relative_to) if m.relative_to else m.relative_to
    if m.relative_to is None:
        return f"transformer error ({kk})"
    if m.mode == "ratio":
        return f"transformer error / {ref} error ({kk})"
    return f"transformer error − {ref} error ({kk})"


def _wrap(text: str, width: int) -> str:
    """Lines of at most `width` characters, broken between words (never inside one)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


def _norm(m: CoverageMap, data: np.ndarray):
    finite = data[np.isfinite(data)]
    if m.relative_to is None:
        top = float(finite.max()) if finite.size else 1.0
        return colors.Normalize(vmin=0.0, vmax=max(top, 1e-6)), "viridis_r"
    if m.mode == "ratio":
        span = float(np.max(np.abs(np.log10(finite)))) if finite.size else 1.0
        span = max(span, 0.05)
        return colors.LogNorm(vmin=10**-span, vmax=10**span), "RdBu_r"
    if finite.size and finite.min() >= 0:  # worse everywhere: a sequential scale, no unused blue half
        return colors.Normalize(vmin=0.0, vmax=max(float(finite.max()), 1e-6)), "Reds"
    if finite.size and finite.max() <= 0:  # better everywhere
        return colors.Normalize(vmin=min(float(finite.min()), -1e-6), vmax=0.0), "Blues_r"
    half = float(np.max(np.abs(finite))) if finite.size else 1.0
    return colors.CenteredNorm(vcenter=0.0, halfrange=max(half, 1e-6)), "RdBu_r"


def _outline_support(ax, sup: np.ndarray, inset: float = 0.07) -> None:
    """Outline each region of True cells, drawn slightly inside it so that touching regions stay apart."""
    nr, nc = sup.shape

    def inside(i: int, j: int) -> bool:
        return 0 <= i < nr and 0 <= j < nc and bool(sup[i, j])

    for i in range(nr):
        for j in range(nc):
            if not sup[i, j]:
                continue
            top, bottom, left, right = (not inside(i - 1, j), not inside(i + 1, j), not inside(i, j - 1),
                                        not inside(i, j + 1))
            x0, x1 = j - 0.5 + (inset if left else 0.0), j + 0.5 - (inset if right else 0.0)
            y0, y1 = i - 0.5 + (inset if top else 0.0), i + 0.5 - (inset if bottom else 0.0)
            for edge, seg in ((top, ((x0, x1), (y0, y0))), (bottom, ((x0, x1), (y1, y1))),
                              (left, ((x0, x0), (y0, y1))), (right, ((x1, x1), (y0, y1)))):
                if edge:
                    ax.plot(*seg, color="black", lw=2.4, solid_capstyle="projecting", zorder=6)


def plot_heatmap(m: CoverageMap, out_dir: str | Path, stem: str = "heatmap", title: str | None = None) -> list[Path]:
    """The map as an annotated heatmap; NaN cells hatched and labelled, the pretraining support outlined."""
    data = m.mean.to_numpy(dtype=float)
    nr, nc = data.shape
    ylabels = [_wrap(short_label(v), 38) for v in m.mean.index]
    xlabels = [_wrap(short_label(v), 16) for v in m.mean.columns]
    ylab_w = max((max(len(s) for s in lab.split("\n")) for lab in ylabels), default=4)
    width = min(22.0, max(6.5, 0.95 * nc + 0.075 * ylab_w + 2.6))
    height = min(20.0, max(3.6, 0.62 * nr + 2.4))
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    norm, cmap_name = _norm(m, data)
    from matplotlib import colormaps

    cmap = colormaps[cmap_name].with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    fs = max(6.5, min(10.0, 48.0 / max(nc, 1) + 3))
    n, n_trials = m.n.to_numpy(), m.n_trials.to_numpy()
    for i in range(nr):
        for j in range(nc):
            v = data[i, j]
            if math.isfinite(v):
                r, g, b, _ = cmap(norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                text = f"{v:.2f}" if 0.01 <= abs(v) < 100 or v == 0 else f"{v:.2g}"
                if n[i, j] < n_trials[i, j]:
                    text += f"\n({n[i, j]}/{n_trials[i, j]} trials)"
                ax.text(j, i, text, ha="center", va="center", fontsize=fs, color="white" if dark else "black")
            else:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#b0b0b0", lw=0))
                label = f"missing\n(0/{n_trials[i, j]} trials)" if n_trials[i, j] else "not run"
                ax.text(j, i, label, ha="center", va="center", fontsize=fs * 0.9, color="#555555")
    _outline_support(ax, m.support.to_numpy(dtype=bool))
    ax.set_xlim(-0.5, nc - 0.5)
    ax.set_ylim(nr - 0.5, -0.5)
    ax.set_xticks(range(nc), xlabels, fontsize=9, rotation=0 if max(map(len, xlabels), default=0) < 8 else 30,
                  ha="center" if max(map(len, xlabels), default=0) < 8 else "right")
    ax.set_yticks(range(nr), ylabels, fontsize=9)
    ax.set_xlabel(axis_label(m.test_axis), fontsize=10)
    ax.set_ylabel(axis_label(m.coverage), fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    ref = estimator_label(m.relative_to) if m.relative_to else m.relative_to
    if m.relative_to is None:
        cb_label = "transformer error (lower is better)"
    elif m.mode == "ratio":
        cb_label = f"transformer / {ref} (1 = as good; red = worse)"
    else:
        cb_label = f"transformer − {ref} (0 = as good; red = worse)"
    cb.set_label(cb_label, fontsize=9)
    ax.legend(handles=[Line2D([], [], color="black", lw=2.6, label="inside the pretraining support")],
              loc="upper left", bbox_to_anchor=(0, -0.12 if max(map(len, xlabels), default=0) < 8 else -0.3),
              fontsize=8, frameon=False)
    where = ", ".join(f"{k}={v}" for k, v in m.meta.get("where", {}).items())
    ax.set_title(title or value_label(m) + (f" [{where}]" if where else ""), fontsize=11)
    return save(fig, out_dir, stem)


def plot_curves(
    curves: pd.DataFrame,
    out_dir: str | Path,
    stem: str = "curves",
    title: str = "",
    support: Mapping[str, bool] | None = None,
    dim: int | None = None,
) -> list[Path]:
    """Error vs k: one panel per eval task, a line and a band for the model and every baseline."""
    tasks = list(dict.fromkeys(curves["task"]))
    ncols = min(4, max(1, len(tasks)))
    nrows = math.ceil(len(tasks) / ncols) if tasks else 1
    fig = Figure(figsize=(3.9 * ncols + 0.6, 3.3 * nrows + 0.9))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    order = [e for e in ESTIMATORS if e in set(curves["estimator"])]
    order += [e for e in dict.fromkeys(curves["estimator"]) if e not in order]
    for idx, task in enumerate(tasks):
        ax = axes[idx // ncols][idx % ncols]
        sub = curves[curves["task"] == task]
        top = 0.0
        for est in reversed(order):  # the model last, on top
            c = sub[sub["estimator"] == est].sort_values("k")
            if c.empty or c["mean"].isna().all():
                continue
            style = REGISTRY[est].style if est in REGISTRY else {}
            ax.plot(c["k"], c["mean"], label=estimator_label(est), **style)
            ax.fill_between(c["k"], c["ci_low"], c["ci_high"], color=style.get("color"), alpha=0.15, lw=0)
            top = max(top, float(np.nanmax(c["mean"])))
        if sub["mean"].isna().all():
            ax.text(0.5, 0.5, "no results\n(failed or unfinished trials)", ha="center", va="center",
                    transform=ax.transAxes, color="#777777")
        ax.set_ylim(0, min(max(1.15, top * 1.05), 3.0))
        if dim and dim <= sub["k"].max():
            ax.axvline(dim, color="#bbbbbb", lw=0.8, ls="--", zorder=0)
        where = ""
        if support is not None and task in support:
            where = "\n(inside pretraining support)" if support[task] else "\n(outside pretraining support)"
        ax.set_title(_wrap(family_label(str(task)), 44) + where, fontsize=9)
        ax.grid(alpha=0.25)
        if idx % ncols == 0:
            ax.set_ylabel("normalized squared error")
        if idx // ncols == nrows - 1 or idx + ncols >= len(tasks):
            ax.set_xlabel("in-context examples k")
    for idx in range(len(tasks), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    handles, labels = [], []
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
    if handles:
        pairs = sorted(zip(labels, handles), key=lambda p: [estimator_label(e) for e in order].index(p[0])
                       if p[0] in [estimator_label(e) for e in order] else 99)
        fig.legend([h for _, h in pairs], [lab for lab, _ in pairs], loc="lower center",
                   ncol=len(pairs) if len(pairs) <= 3 * ncols + 1 else 5,
                   fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if nrows == 1 else 0.04, 1, 0.97))
    return save(fig, out_dir, stem)


def plot_model_selection(table: pd.DataFrame, out_dir: str | Path, stem: str = "model_selection",
                         title: str = "", k_label: str = "mean over k ≥ 1") -> list[Path]:
    """Per family: the model's error on that family vs its pretraining weight, the specialist and Bayes."""
    fams = list(dict.fromkeys(table["family"]))
    fig = Figure(figsize=(5.2 * max(1, len(fams)) + 0.4, 4.2))
    axes = fig.subplots(1, max(1, len(fams)), squeeze=False)[0]
    for ax, fam in zip(axes, fams):
        sub = table[table["family"] == fam]
        for series, est in (("model", "model"), ("bayes_pretrain", "bayes_pretrain")):
            c = sub[sub["series"] == series].sort_values("weight")
            if c.empty:
                continue
            st = REGISTRY[est].style
            yerr = [(c["mean"] - c["ci_low"]).fillna(0.0), (c["ci_high"] - c["mean"]).fillna(0.0)]  # n = 1: none
            ax.errorbar(c["weight"], c["mean"], yerr=yerr,
                        marker="o", capsize=3, color=st["color"], ls=st.get("ls", "-"), lw=st["lw"],
                        label="transformer (this mixture)" if est == "model" else estimator_label(est))
        gone = sub[(sub["series"] == "model") & sub["mean"].isna()]
        if not gone.empty:
            ax.plot(gone["weight"], np.zeros(len(gone)), "x", color="#b00020", ms=9, mew=2, clip_on=False,
                    label="no result (failed / unfinished)", zorder=6)
        spec = sub[sub["series"] == "specialist"]
        if not spec.empty and np.isfinite(spec["mean"].iloc[0]):
            r = spec.iloc[0]
            ax.axhline(r["mean"], color="#9467bd", lw=1.6, ls="--",
                       label=f"specialist (weight 1 on {family_label(fam)})")
            if np.isfinite(r["ci_low"]):  # one seed has no interval
                ax.axhspan(r["ci_low"], r["ci_high"], color="#9467bd", alpha=0.12, lw=0)
        bt = sub[sub["series"] == "bayes_task"]
        if not bt.empty and bt["mean"].notna().any():
            ax.axhline(float(bt["mean"].mean()), color=REGISTRY["bayes_task"].style["color"], lw=1.2, ls=":",
                       label=estimator_label("bayes_task"))
        ax.set_xlabel(f"pretraining weight of {family_label(fam)}")
        ax.set_ylabel(f"error on {family_label(fam)} ({k_label})")
        ax.set_title(f"eval on {family_label(fam)}", fontsize=10)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, out_dir, stem)
