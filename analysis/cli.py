"""`iclmix analyze heatmap|curves|report|check|export`: figures, a report and the finding's check of a sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_core.errors import ConfigError, check_writable_folder


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="coverage maps, ICL curves and a report of a sweep (from MLflow)")
    asub = p.add_subparsers(dest="analyze_command", required=True, metavar="SUBCOMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--sweep", required=True, help="sweep name (= MLflow experiment)")
        q.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///ABS/runs/SWEEP/mlflow.db)")
        q.add_argument("--coverage", help="coverage axis: weight:FAMILY_ID, nnz_set, freq_band, mixture or a trial "
                                          "column such as model.n_layer (default: chosen from the sweep)")
        q.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                       help="keep only trials with this value (repeatable), e.g. model.n_layer=4")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--cache", help="artifact cache for remote stores (default: ~/.cache/iclmix/artifacts)")
        q.add_argument("--workers", type=int, default=8, help="parallel artifact downloads (default 8)")
        q.add_argument("--no-log", action="store_true", help="do not log the outputs to the sweep's parent run")
        q.add_argument("--dpi", type=int, default=130, help="PNG resolution (default 130; e.g. 70 for small docs)")

    def map_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--test-axis", help="nnz, freq, alpha or task (default: chosen from the eval tasks)")
        q.add_argument("--k", default="all", help="in-context examples: an integer or 'all' (mean over k >= 1)")
        q.add_argument("--relative-to", default="auto",
                       help="bayes_task, best_baseline, an estimator name or none (default: bayes_task if evaluated)")
        q.add_argument("--mode", choices=("excess", "ratio"), default="excess",
                       help="excess = model - reference (default); ratio = model / reference")

    h = asub.add_parser("heatmap", help="the coverage-vs-generalization map (PNG, SVG, CSV)")
    common(h)
    map_opts(h)
    h.set_defaults(func=cmd_heatmap)

    c = asub.add_parser("curves", help="ICL curves (error vs k) per eval task, model and baselines")
    common(c)
    c.add_argument("--value", help="only trials with this coverage value (default: one figure per value)")
    c.set_defaults(func=cmd_curves)

    r = asub.add_parser("report", help="report.html: every figure, its tables, the sweep file and trial status")
    common(r)
    map_opts(r)
    r.set_defaults(func=cmd_report)

    k = asub.add_parser("check", help="PASS/FAIL: is the finding of the sweep file's `checks:` section visible?")
    k.add_argument("--sweep", required=True, help="sweep name (= MLflow experiment)")
    k.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///ABS/runs/SWEEP/mlflow.db)")
    k.add_argument("--file", help="sweep file whose `checks:` to use (default: the one logged with the sweep)")
    k.add_argument("--frame", help="read results from a frame saved by `analyze export` instead of MLflow")
    k.add_argument("--out", help="also write check.txt and check.csv (the numbers per k / task) here")
    k.add_argument("--as", dest="as_estimator", metavar="ESTIMATOR",
                   help="judge this estimator in the model's place, e.g. bayes_pretrain: can a perfect learner pass?")
    k.add_argument("--cache", help="artifact cache for remote stores (default: ~/.cache/iclmix/artifacts)")
    k.add_argument("--workers", type=int, default=8, help="parallel artifact downloads (default 8)")
    k.set_defaults(func=cmd_check)

    e = asub.add_parser("export", help="save the sweep's tidy frame (one row per trial x task x k x estimator)")
    e.add_argument("--sweep", required=True, help="sweep name (= MLflow experiment)")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///ABS/runs/SWEEP/mlflow.db)")
    e.add_argument("--out", required=True, help="CSV file (.csv or .csv.gz)")
    e.add_argument("--cache", help="artifact cache for remote stores (default: ~/.cache/iclmix/artifacts)")
    e.add_argument("--workers", type=int, default=8, help="parallel artifact downloads (default 8)")
    e.set_defaults(func=cmd_export)


def _where(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--where", f"expected COLUMN=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _load(args: argparse.Namespace):
    from .load import default_tracking_uri, load_sweep, tracking_uri_from_env

    if getattr(args, "dpi", None) is not None:
        if not 20 <= args.dpi <= 600:
            raise ConfigError("--dpi", f"must be between 20 and 600, got {args.dpi}")
        from . import figures

        figures.DPI = args.dpi

    uri = tracking_uri_from_env(args.tracking_uri) or default_tracking_uri(args.sweep)
    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    return load_sweep(args.sweep, uri, cache_dir=args.cache, workers=args.workers)


def _reference(value: str):
    return "auto" if value == "auto" else (None if value.lower() == "none" else value)


def _finish(args: argparse.Namespace, frame, paths: list[Path], artifact_path: str) -> int:
    for p in paths:
        print(p)
    if not args.no_log:
        from .load import log_to_parent

        try:
            run = log_to_parent(frame, paths, artifact_path)
        except Exception as e:  # the outputs exist; a read-only store must not fail the command
            print(f"iclmix: warning: could not log to the sweep's parent run: {e}", file=sys.stderr)
        else:
            if run:
                print(f"logged {len(paths)} file(s) to parent run {run} under {artifact_path}/")
    return 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    from . import figures
    from .maps import coverage_map, default_reference

    check_writable_folder(Path(args.out), "--out")  # before minutes of loading
    frame = _load(args)
    where = _where(args.where)
    ref = _reference(args.relative_to)
    if ref == "auto":
        ref = default_reference(frame)
    m = coverage_map(frame, args.coverage, args.test_axis, args.k, ref, mode=args.mode, where=where)
    m.meta.update(sweep=args.sweep, where=where)
    out = Path(args.out)
    stem = figures.heatmap_stem(m)
    paths = figures.plot_heatmap(m, out, stem)
    m.to_long().to_csv(out / f"{stem}.csv", index=False)
    return _finish(args, frame, [*paths, out / f"{stem}.csv"], "analysis")


def cmd_curves(args: argparse.Namespace) -> int:
    from . import figures
    from .maps import apply_where, coverage_values, default_axes, icl_curves, select_value
    from .report import task_support

    check_writable_folder(Path(args.out), "--out")  # before minutes of loading
    frame = apply_where(_load(args), _where(args.where))
    coverage = args.coverage or default_axes(frame)[0]
    values = [args.value] if args.value is not None else coverage_values(frame, coverage)
    dims = frame["dim"].dropna().unique()
    out, paths = Path(args.out), []
    for value in values:
        curves = icl_curves(frame, coverage=coverage, value=value)
        sub = select_value(frame, coverage, value)
        label = figures.short_label(value)
        stem = figures.curves_stem(coverage, value)
        paths += figures.plot_curves(curves, out, stem, f"{figures.axis_label(coverage)} = {label}",
                                     task_support(sub),
                                     int(dims[0]) if len(dims) == 1 else None)
        curves.to_csv(out / f"{stem}.csv", index=False)
        paths.append(out / f"{stem}.csv")
    return _finish(args, frame, paths, "analysis")


def cmd_report(args: argparse.Namespace) -> int:
    from .load import sweep_file
    from .report import write_report

    check_writable_folder(Path(args.out), "--out")  # before minutes of loading
    frame = _load(args)
    page = write_report(frame, args.out, coverage=args.coverage, test_axis=args.test_axis, k=args.k,
                        relative_to=_reference(args.relative_to), mode=args.mode, where=_where(args.where),
                        sweep_file=sweep_file(args.sweep, frame.attrs["tracking_uri"]))
    files = sorted(p for p in Path(args.out).iterdir() if p.is_file())
    files.remove(page)
    return _finish(args, frame, [page, *files], "analysis/report")


def _check_spec(args: argparse.Namespace, tracking_uri: str | None):
    from icl_core.config import read_yaml
    from sweeps.spec import validate_sweep

    from .checks import validate_checks

    if args.file:
        source, data = args.file, read_yaml(args.file)
    else:
        from .load import sweep_file

        if tracking_uri is None:
            raise ConfigError("--file", "required with --frame (the checks come from a sweep file)")
        logged = sweep_file(args.sweep, tracking_uri)
        if logged is None:
            raise ConfigError("--file", f"no sweep file is logged with sweep {args.sweep!r}; pass --file")
        from icl_core.config import parse_yaml

        source, data = f"{logged[0]} (logged with the sweep)", parse_yaml(logged[1])
    spec = validate_sweep(data, source)
    check = validate_checks(spec.checks)
    if check is None:
        raise ConfigError("checks", f"{source} has no `checks:` section")
    return check


def cmd_check(args: argparse.Namespace) -> int:
    from icl_core.estimators import ESTIMATORS

    from .checks import as_model, run_check

    if args.as_estimator is not None and args.as_estimator not in set(ESTIMATORS) - {"model"}:
        raise ConfigError("--as", f"unknown estimator {args.as_estimator!r}; one of "
                                  f"{', '.join(e for e in ESTIMATORS if e != 'model')}")
    if args.out:
        check_writable_folder(Path(args.out), "--out")
    if args.frame:
        from .load import read_frame

        frame, uri = read_frame(args.frame, args.sweep), None
    else:
        frame = _load(args)
        uri = frame.attrs["tracking_uri"]
    check = _check_spec(args, uri)
    if args.as_estimator:
        frame = as_model(frame, args.as_estimator)
    result = run_check(frame, check)
    text = result.text(args.sweep)
    if args.as_estimator:
        text = f"({args.as_estimator} judged in the model's place)\n{text}"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.txt").write_text(text + "\n")
        result.table.to_csv(out / "check.csv", index=False)
    return 0 if result.passed else 1


def cmd_export(args: argparse.Namespace) -> int:
    from .load import write_frame

    if Path(args.out).is_dir():
        raise ConfigError("--out", f"{args.out} is a folder: pass a file name such as FRAME.csv.gz")
    check_writable_folder(Path(args.out).parent, "--out")
    frame = _load(args)
    path = write_frame(frame, args.out)
    print(f"{path}: {frame['run_id'].nunique()} trials, {len(frame)} rows")
    return 0
