"""The bad-input matrix: run configs, sweep files and CLI arguments a user gets wrong. Each gets exit status 2 and
one line naming the field, no traceback, and nothing is written. Run through the real `iclmix` entry point."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from iclmix.cli import main

GOOD = {
    "seed": 0,
    "data": {"dim": 5, "n_points": 11, "mixture": [{"family": "linear", "weight": 0.5},
                                                   {"family": "sparse_linear", "nnz": 1, "weight": 0.5}]},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {"steps": 20, "batch_size": 16, "lr": 1.0e-3, "checkpoint_every": 10},
    "eval": {"n_prompts": 16},
}
GOOD_YAML = yaml.safe_dump(GOOD, sort_keys=False)


def cfg(**sections) -> dict:
    """GOOD with some keys replaced: cfg(train={"steps": 0}) or cfg(seed=-1)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for key, value in sections.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def sweep(**fields) -> dict:
    return {"name": "bad", "base": GOOD, "grid": {"model.n_layer": [1, 2]}, "seeds": [0], **fields}


MIX = "mixture(0.5*linear+0.5*sparse_linear(nnz=1))"

# (id, file content: a mapping, raw YAML text or raw bytes, the field the one line must name)
RUN_CONFIGS = [
    ("batch-huge", cfg(train={"batch_size": 1_000_000_000}), "train.batch_size"),
    ("batch-1e9", GOOD_YAML.replace("batch_size: 16", "batch_size: 1e9"), "train.batch_size"),
    ("dim-huge", cfg(data={"dim": 1_000_000_000}), "data.dim"),
    ("points-huge", cfg(data={"n_points": 10_000_000}), "data.n_points"),
    ("hidden-huge", cfg(data={"mixture": [{"family": "relu_net", "hidden": 1_000_000_000}]}), "data.mixture"),
    ("model-huge", cfg(model={"n_layer": 1_000_000, "n_head": 1, "n_embd": 2**20}), "model.n_layer"),
    ("steps-1e18", cfg(train={"steps": 10**18}), "train.steps"),
    ("steps-float", cfg(train={"steps": 1e18}), "train.steps"),
    ("steps-bool", cfg(train={"steps": True}), "train.steps"),
    ("steps-str", cfg(train={"steps": "50"}), "train.steps"),
    ("steps-zero", cfg(train={"steps": 0}), "train.steps"),
    ("seed-2^63", cfg(seed=2**63), "seed"),
    ("seed-negative", cfg(seed=-1), "seed"),
    ("eval-seed", cfg(eval={"n_prompts": 16, "seed": 2**64}), "eval.seed"),
    ("betas-range", cfg(train={"betas": [2, -1]}), "train.betas"),
    ("betas-one", cfg(train={"betas": [0.9]}), "train.betas"),
    ("lr-word", cfg(train={"lr": "fast"}), "train.lr"),
    ("lr-nan", cfg(train={"lr": float("nan")}), "train.lr"),
    ("lr-negative", cfg(train={"lr": -1.0e-3}), "train.lr"),
    ("curriculum-backwards", cfg(data={"curriculum": {"dims": {"start": 5, "end": 2, "inc": 1, "interval": 10}}}),
     "data.curriculum.dims.start"),
    ("warmup-past-steps", cfg(train={"warmup_steps": 300}), "train.warmup_steps"),
    ("wsd-too-long", cfg(train={"schedule": "wsd", "decay_steps": 50}), "train.decay_steps"),
    ("decay-without-wsd", cfg(train={"decay_steps": 5}), "train.decay_steps"),
    ("schedule", cfg(train={"schedule": "linear"}), "train.schedule"),
    ("device", cfg(train={"device": "tpu"}), "train.device"),
    ("unknown-key", cfg(train={"stepz": 5}), "train.stepz"),
    ("unknown-section", cfg(optim={"lr": 1}), "optim"),
    ("weights-sum", cfg(data={"mixture": [{"family": "linear", "weight": 0.7}]}), "data.mixture"),
    ("family", cfg(data={"mixture": [{"family": "cubic"}]}), "data.mixture[0].family"),
    ("nnz-past-dim", cfg(data={"mixture": [{"family": "sparse_linear", "nnz": 9}]}), "data.mixture"),
    ("estimator", cfg(eval={"estimators": ["magic"]}), "eval.estimators[0]"),
    ("noise", cfg(data={"noise_std": -1.0}), "data.noise_std"),
    ("checkpoint-every", cfg(train={"checkpoint_every": 0}), "train.checkpoint_every"),
    ("heads", cfg(model={"n_head": 3}), "model.n_embd"),
    ("layout", cfg(model={"layout": "flat"}), "model.layout"),
    ("duplicate-key", GOOD_YAML + "seed: 1\n", "duplicate key 'seed'"),
    ("duplicate-nested", "train: {steps: 5, steps: 6}\n", "duplicate key 'steps'"),
    ("empty", "", "is empty"),
    ("only-comments", "# nothing here\n", "is empty"),
    ("a-list", "- seed: 0\n", "mapping"),
    ("yaml-syntax", "data: {dim: 5\n", "line"),
    ("non-utf8", b"seed: 0\ndata: {dim: \xff\xfe}\n", "UTF-8"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "UTF-8"),
]


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def run_main(capsys, *argv) -> tuple[int, str]:
    """`iclmix ARGV` in this process: its exit status and its stderr."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, field: str) -> None:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iclmix: error: "), err
    assert field in lines[0], (field, lines[0])
    assert "Traceback" not in err


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("content, field", [c[1:] for c in RUN_CONFIGS], ids=[c[0] for c in RUN_CONFIGS])
def test_bad_run_config_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, content, field):
    path = write(tmp_path / "run.yaml", content)
    before = listing(tmp_path)
    start = time.monotonic()
    code, err = run_main(capsys, "train", path, "--out", tmp_path / "out", "--no-progress")
    assert_one_line(code, err, field)
    assert listing(tmp_path) == before  # no output folder, no file
    assert time.monotonic() - start < 2.0


def test_config_files_that_are_not_files(tmp_path, capsys):
    cases = {"folder": (tmp_path / "a-folder", "is a folder"), "missing": (tmp_path / "nope.yaml", "no such file")}
    (tmp_path / "a-folder").mkdir()
    for name, (path, field) in cases.items():
        code, err = run_main(capsys, "train", path, "--out", tmp_path / "out")
        assert_one_line(code, err, field)
        assert str(path) in err, name
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file anyway")
def test_unreadable_config_file(tmp_path, capsys):
    path = write(tmp_path / "run.yaml", GOOD)
    path.chmod(0)
    code, err = run_main(capsys, "train", path, "--out", tmp_path / "out")
    assert_one_line(code, err, "cannot read")


CLI_ARGS = [
    ("set-not-a-number", ["--set", "train.steps=abc"], "train.steps"),
    ("set-without-equals", ["--set", "train.steps"], "--set"),
    ("set-unknown-key", ["--set", "train.stepz=5"], "train.stepz"),
    ("set-float-for-int", ["--set", "train.steps=1e3"], "train.steps"),
    ("set-bool", ["--set", "train.steps=true"], "train.steps"),
]


@pytest.mark.parametrize("extra, field", [c[1:] for c in CLI_ARGS], ids=[c[0] for c in CLI_ARGS])
def test_bad_overrides(tmp_path, capsys, extra, field):
    path = write(tmp_path / "run.yaml", GOOD)
    code, err = run_main(capsys, "train", path, "--out", tmp_path / "out", *extra)
    assert_one_line(code, err, field)
    assert not (tmp_path / "out").exists()


def test_bad_output_places(tmp_path, capsys):
    path = write(tmp_path / "run.yaml", GOOD)
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "run"):
        code, err = run_main(capsys, "train", path, "--out", out, "--no-progress")
        assert_one_line(code, err, "--out")
    assert (tmp_path / "a-file").read_text() == "x"


def test_bad_analysis_outputs(tmp_path, capsys):
    # Checked before a frame is read: minutes of loading must not end in a traceback about --out.
    (tmp_path / "a-file").write_text("x")
    frame = Path(__file__).parent / "fixtures" / "quickstart.csv.gz"
    quickstart = Path(__file__).parents[1] / "sweeps" / "quickstart.yaml"
    for argv in (["check", "--sweep", "q", "--frame", frame, "--file", quickstart, "--out", tmp_path / "a-file"],
                 ["heatmap", "--sweep", "q", "--tracking-uri", "sqlite:///nope.db", "--out", tmp_path / "a-file" / "x"],
                 ["export", "--sweep", "q", "--tracking-uri", "sqlite:///nope.db", "--out", tmp_path]):
        code, err = run_main(capsys, "analyze", *argv)
        assert_one_line(code, err, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


SWEEPS = [
    ("simplex-huge", sweep(grid={"data.mixture": {"simplex": {"components": [{"family": "linear"},
                      {"family": "sparse_linear", "nnz": 1}], "steps": 1_000_000}}}),
     "grid.data.mixture.simplex.steps"),
    ("simplex-3-huge", sweep(grid={"data.mixture": {"simplex": {"components": [{"family": "linear"},
                        {"family": "sparse_linear", "nnz": 1}, {"family": "sparse_linear", "nnz": 2}],
                        "steps": 1000}}}), "grid.data.mixture.simplex.steps"),
    ("grid-huge", sweep(grid={"train.lr": [1e-4 * (i + 1) for i in range(200)], "train.steps": list(range(10, 210))}),
     "grid"),
    ("seeds-huge", sweep(seeds=list(range(20_000))), "seeds"),
    ("seed-2^63", sweep(seeds=[2**63]), "seeds"),
    ("seed-bool", sweep(seeds=[True]), "seeds"),
    ("model-huge", sweep(base=cfg(model={"n_layer": 1_000_000, "n_head": 1, "n_embd": 2**20})), "base.model.n_layer"),
    ("grid-cell-huge", sweep(grid={"train.batch_size": [16, 10**9]}), "train.batch_size"),
    ("cpu-str", sweep(resources={"cpu": "2"}), "resources.cpu"),
    ("cpu-inf", sweep(resources={"cpu": float("inf")}), "resources.cpu"),
    ("max-failures", sweep(max_failures=-1), "max_failures"),
    ("trials-per-cell", sweep(tune={"params": {"train.lr": {"loguniform": [1e-4, 1e-3]}}, "trials_per_cell": 0}),
     "tune.trials_per_cell"),
    ("tune-metric", sweep(tune={"params": {"train.lr": {"loguniform": [1e-4, 1e-3]}}, "metric": "eval_los"}),
     "tune.metric"),
    ("tune-int-float", sweep(tune={"params": {"model.n_layer": {"int": [1.5, 3]}}}), "tune.params"),
    ("checks-family", sweep(checks={"finding": "model_selection", "family_a": "linaer",
                                    "family_b": "sparse_linear(nnz=1)"}), "checks.family_a"),
    ("checks-mixture", sweep(checks={"finding": "frequency_extremes", "mixture": "mixture(1.0*sine)"}),
     "checks.mixture"),
    ("checks-tol-str", sweep(checks={"finding": "model_selection", "family_a": "linear",
                                     "family_b": "sparse_linear(nnz=1)", "abs_tol": "0.1"}), "checks.abs_tol"),
    ("checks-estimator", sweep(checks={"finding": "interpolation", "mixture": MIX, "test_nnz": [2], "high": "olss"}),
     "checks.high"),
    ("name", sweep(name="no spaces"), "name"),
    ("duplicate-key", yaml.safe_dump(sweep()) + "seeds: [1]\n", "duplicate key 'seeds'"),
    ("empty", "", "mapping"),
    ("non-utf8", b"name: \xff\n", "UTF-8"),
]


@pytest.mark.parametrize("content, field", [c[1:] for c in SWEEPS], ids=[c[0] for c in SWEEPS])
def test_bad_sweep_file_is_one_line_exit_2_within_2_s(tmp_path, capsys, content, field):
    path = write(tmp_path / "sweep.yaml", content)
    for command in ("plan", "run"):
        start = time.monotonic()
        extra = ["--storage", tmp_path / "store"] if command == "run" else []
        code, err = run_main(capsys, "sweep", command, path, *extra)
        assert_one_line(code, err, field)
        assert time.monotonic() - start < 2.0, (command, time.monotonic() - start)
    assert listing(tmp_path) == ["sweep.yaml"]


def test_sweep_file_that_is_a_folder(tmp_path, capsys):
    code, err = run_main(capsys, "sweep", "plan", tmp_path)
    assert_one_line(code, err, "is a folder")


FRAMES = [
    ("truncated-gzip", lambda p: p.write_bytes(gzip.compress(b"run_id,mixture,task,k,estimator,error\n" * 50)[:40]),
     "--frame"),
    ("not-gzip", lambda p: p.write_bytes(b"\x00\x01binary"), "--frame"),
    ("no-columns", lambda p: p.write_bytes(gzip.compress(b"a,b\n1,2\n")), "--frame"),
    ("bad-k", lambda p: p.write_bytes(gzip.compress(b"run_id,mixture,task,k,estimator,error\nr,m,t,x,model,0.1\n")),
     "--frame"),
    ("folder", lambda p: p.mkdir(), "--frame"),
]


@pytest.mark.parametrize("make, field", [c[1:] for c in FRAMES], ids=[c[0] for c in FRAMES])
def test_corrupt_frame_is_one_line(tmp_path, capsys, make, field):
    frame = tmp_path / "frame.csv.gz"
    make(frame)
    sweep_file = write(tmp_path / "sweep.yaml", sweep(checks={"finding": "coverage", "outside": ["linear"]}))
    code, err = run_main(capsys, "analyze", "check", "--sweep", "bad", "--frame", frame, "--file", sweep_file,
                         "--out", tmp_path / "out")
    assert_one_line(code, err, field)
    assert not (tmp_path / "out").exists()


def test_the_one_line_reaches_a_real_terminal(tmp_path):
    # The same, through a real `iclmix` process: exit status 2, one line, nothing written.
    path = write(tmp_path / "run.yaml", cfg(train={"steps": True}))
    r = run_cli("train", path, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iclmix: error: train.steps: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
