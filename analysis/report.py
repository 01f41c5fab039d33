"""A one-page, self-contained HTML report of a sweep: figures (PNG embedded as data URIs, SVG beside the
page), the tables behind them, the sweep file and the status of every trial."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl_core.config import ConfigError

from . import figures
from .load import trials_table
from .maps import (
    CoverageMap,
    apply_where,
    check_k,
    coverage_map,
    coverage_values,
    default_axes,
    default_reference,
    icl_curves,
    model_selection,
)

AUTO = "auto"
MAX_CURVE_FIGURES = 16

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
td.sup{outline:2px solid #000;outline-offset:-3px}td.miss{background:#eee;color:#777;font-style:italic}
.ok{color:#1b7f2a}.bad{color:#b00020;font-weight:bold}pre{background:#f7f7f7;border:1px solid #ddd;padding:10px;
overflow:auto;font-size:12px}img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:13px}
details{margin:6px 0 14px}summary{cursor:pointer;color:#245}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    svg = path.with_suffix(".svg")
    link = f' <a href="{html.escape(svg.name)}">SVG</a>' if svg.is_file() else ""
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f'<figcaption class="note">{html.escape(path.name)}{link}</figcaption></figure>')


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "NaN" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def table_html(df: pd.DataFrame, left: tuple[str, ...] = ()) -> str:
    """A plain HTML table (text columns left-aligned)."""
    head = "".join(f'<th class="l">{html.escape(str(c))}</th>' if c in left else f"<th>{html.escape(str(c))}</th>"
                   for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = "".join(f'<td class="l">{_fmt(row[c])}</td>' if c in left else f"<td>{_fmt(row[c])}</td>"
                        for c in df.columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def map_html(m: CoverageMap) -> str:
    """The map as a table: mean [CI] (n/trials); support outlined, missing cells marked."""
    head = f'<th class="l">{html.escape(m.coverage)} \\ {html.escape(m.test_axis)}</th>' + "".join(
        f"<th>{html.escape(figures.short_label(c))}</th>" for c in m.mean.columns)
    rows = []
    for r in m.mean.index:
        cells = [f'<th class="l">{html.escape(figures.short_label(r))}</th>']
        for c in m.mean.columns:
            v, n, nt = m.mean.loc[r, c], int(m.n.loc[r, c]), int(m.n_trials.loc[r, c])
            cls = ["sup"] if m.support.loc[r, c] else []
            if math.isnan(v):
                cls.append("miss")
                text = f"missing ({n}/{nt})" if nt else "not run"
            else:
                lo, hi = m.ci_low.loc[r, c], m.ci_high.loc[r, c]
                interval = f" [{lo:.4g}, {hi:.4g}]" if not math.isnan(lo) else ""  # one seed: no interval
                text = f"{v:.4g}{interval} (n = {n}" + (f" of {nt})" if nt != n else ")")
            cells.append(f'<td class="{" ".join(cls)}">{text}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _curves_table(curves: pd.DataFrame) -> pd.DataFrame:
    wide = curves.pivot_table(index=["task", "estimator"], columns="k", values="mean", aggfunc="first",
                              dropna=False, sort=False)
    wide.columns = [f"k={c}" for c in wide.columns]
    return wide.reset_index()


def task_support(frame: pd.DataFrame) -> dict[str, bool]:
    rows = frame.drop_duplicates(["run_id", "task"])
    return {str(t): bool(v) for t, v in rows.groupby("task", sort=False, observed=True)["in_support"].all().items()}


def _blank_nan(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype(object).where(df.notna(), "")


def status_section(frame: pd.DataFrame) -> str:
    trials = trials_table(frame)
    counts = trials["status"].value_counts().rename_axis("status").reset_index(name="trials")
    parts = [table_html(counts, left=("status",))]
    bad = trials[(trials["status"] != "FINISHED") | ~trials["has_eval"]]
    if bad.empty:
        parts.append(f'<p class="ok">All {len(trials)} trials finished with an evaluation.</p>')
    else:
        parts.append(f'<p class="bad">{len(bad)} of {len(trials)} trials have no results (shown as missing in every '
                     "figure and table):</p>")
        cols = ["run_name", "cell_label", "seed", "status", "failure"]
        parts.append(table_html(_blank_nan(bad[cols]), left=("run_name", "cell_label", "status", "failure")))
    parts.append("<details><summary>All trials</summary>"
                 + table_html(_blank_nan(trials.drop(columns=["run_id"])),
                              left=("run_name", "status", "cell", "cell_label", "mixture", "model_size", "failure"))
                 + "</details>")
    return "".join(parts)


def write_report(
    frame: pd.DataFrame,
    out_dir: str | Path,
    *,
    coverage: str | None = None,
    test_axis: str | None = None,
    k: int | str = "all",
    relative_to: str | None = AUTO,
    mode: str = "excess",
    where: Mapping[str, Any] | None = None,
    sweep_file: tuple[str, str] | None = None,
    max_curve_figures: int = MAX_CURVE_FIGURES,
) -> Path:
    """Write `out_dir/report.html` and its figures; returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = frame.attrs.get("sweep", "sweep")
    frame = apply_where(frame, where)
    k = check_k(frame, k)
    dcov, dtest = default_axes(frame)
    coverage, test_axis = coverage or dcov, test_axis or dtest
    ref = default_reference(frame) if relative_to == AUTO else relative_to
    sections: list[str] = []

    # maps
    maps_html = []
    for rel in [ref] + ([None] if ref is not None else []):
        m = coverage_map(frame, coverage, test_axis, k, rel, mode=mode, where=None)
        m.meta.update(sweep=sweep, where=dict(where or {}))
        stem = figures.heatmap_stem(m)
        png = figures.plot_heatmap(m, out, stem)[0]
        m.to_long().to_csv(out / f"{stem}.csv", index=False)
        maps_html.append(f"<h3>{html.escape(figures.value_label(m))}</h3>{_img(png)}"
                         '<p class="note">Cells: mean over seeds [90 % Student-t interval over seeds] (n = trials '
                         "with a value, of how many ran; one seed has no interval). Outlined: the test task is inside "
                         "the pretraining support. "
                         f'Table as CSV: <a href="{stem}.csv">{stem}.csv</a></p>{map_html(m)}')
    sections.append("<h2>Coverage vs generalization</h2>" + "".join(maps_html))

    # model selection
    try:
        ms = model_selection(frame, k)
    except ConfigError as e:
        sections.append(f'<h2>Model selection</h2><p class="note">Not applicable: {html.escape(e.message)}</p>')
    else:
        if not ms.empty:
            klab = "mean over k ≥ 1" if k == "all" else f"k = {k}"
            png = figures.plot_model_selection(ms, out, "model_selection", "model selection", klab)[0]
            ms.to_csv(out / "model_selection.csv", index=False)
            sections.append("<h2>Model selection</h2>" + _img(png)
                            + table_html(ms, left=("family", "series")))

    # ICL curves, one figure per coverage value
    values = coverage_values(frame, coverage)
    curve_html = []
    dims = frame["dim"].dropna().unique()
    for value in values[:max_curve_figures]:
        sub = frame[frame[coverage].astype(str) == str(value)]
        curves = icl_curves(sub)
        label = figures.short_label(value)
        stem = figures.curves_stem(coverage, value)
        png = figures.plot_curves(curves, out, stem, f"{figures.axis_label(coverage)} = {label}",
                                  task_support(sub), int(dims[0]) if len(dims) == 1 else None)[0]
        curves.to_csv(out / f"{stem}.csv", index=False)
        curve_html.append(f"<h3>{html.escape(figures.axis_label(coverage))} = {html.escape(label)}</h3>{_img(png)}"
                          "<details><summary>Mean error per k (table)</summary>"
                          + table_html(_curves_table(curves), left=("task", "estimator")) + "</details>")
    if len(values) > max_curve_figures:
        curve_html.append(f'<p class="note">{len(values) - max_curve_figures} more coverage values not drawn; use '
                          "<code>iclmix analyze curves --value</code>.</p>")
    sections.append("<h2>ICL curves</h2><p class=\"note\">Error after k in-context examples; bands: 90 % bootstrap "
                    "intervals. Dashed vertical line: k = d.</p>" + "".join(curve_html))

    sections.append("<h2>Trial status</h2>" + status_section(frame))
    if sweep_file is not None:
        name, text = sweep_file
        sections.append(f"<h2>Sweep file <code>{html.escape(name)}</code></h2><pre>{html.escape(text)}</pre>")
    else:
        sections.append('<h2>Sweep file</h2><p class="note">The parent run holds no sweep file.</p>')

    n_trials = frame["run_id"].nunique()
    where_txt = ", ".join(f"{a}={b}" for a, b in (where or {}).items()) or "none"
    header = (f"<h1>Sweep <code>{html.escape(sweep)}</code></h1><p class=\"note\">{n_trials} trials · tracking URI "
              f"<code>{html.escape(str(frame.attrs.get('tracking_uri', '')))}</code> · coverage axis "
              f"<code>{html.escape(coverage)}</code> · test axis <code>{html.escape(test_axis)}</code> · k = {k} · "
              f"reference <code>{html.escape(str(ref))}</code> · filter {html.escape(where_txt)}</p>")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(sweep)} — iclmix "
            f"report</title><style>{CSS}</style></head><body>{header}{''.join(sections)}</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
