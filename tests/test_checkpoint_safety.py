"""Checkpoints hold tensors and plain data only: a crafted, damaged or foreign file is one line, never code,
and a write that fails leaves no temp file and the previous checkpoint loadable."""

from __future__ import annotations

import io
import os
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, cli_env, run_cli, tiny_config

from icl_core.config import ConfigError, validate_run_config
from icl_core.train import (
    CHECKPOINT,
    CONFIG,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    load_model,
    train,
)


def tiny(**train_kw) -> dict:
    return tiny_config({"n_prompts": 16, "estimators": ["model", "zero"]}, **{"steps": 20, "checkpoint_every": 10,
                                                                             **train_kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real run directory; its `extra` holds a path and a tuple, which the checkpoint stores as plain data."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(validate_run_config(tiny()), run, progress=False, extra={"mlflow_run_id": "abc", "origin": run,
                                                                   "pair": (1, 2.5)})
    return run


class Payload:
    """Unpickling it opens `marker` for writing (creating it): the code a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(kind: str, marker: Path) -> bytes:
    """A checkpoint-shaped mapping whose model entry runs code when unpickled, as a pickle or a torch file."""
    obj = {"step": 10, "model": Payload(marker), "model_config": {}, "config": {}, "config_hash": "0"}
    if kind == "pickle":
        return pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def one_line_error(r: subprocess.CompletedProcess, path: Path) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(path) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_the_crafted_checkpoint_runs_code_when_unpickled_unsafely(tmp_path, kind):
    # The payload is real: an unrestricted load creates the marker (the tests below show ours never does).
    probe = tmp_path / "probe"
    data = crafted(kind, probe)
    if kind == "pickle":
        pickle.loads(data).get("model").close()
    else:
        torch.load(io.BytesIO(data), weights_only=False)["model"].close()
    assert probe.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch"])
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_crafted_checkpoint_is_refused_without_running_it(tmp_path, kind, command):
    run, marker = tmp_path / "run", tmp_path / "marker"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(crafted(kind, marker))
    if command == "evaluate":
        r = run_cli("evaluate", run, "--no-progress")
    else:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny()))
        r = run_cli("train", tmp_path / "c.yaml", "--out", run, "--resume", "--no-progress")
    line = one_line_error(r, run / CHECKPOINT)
    assert "not an iclmix checkpoint" in line and "retrain" in line
    assert not marker.exists()
    with pytest.raises(ConfigError, match="not an iclmix checkpoint"):
        load_checkpoint(run / CHECKPOINT)  # in this process too
    assert not marker.exists()


def damaged(kind: str, good: bytes) -> bytes:
    return {"truncated": good[: len(good) // 2], "empty": b"", "text": b"step: 10\nmodel: weights\n",
            "random": bytes(range(256)) * 16}[kind]


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "random"])
def test_damaged_checkpoint_is_one_line_exit_2(tmp_path, trained, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(damaged(kind, (trained / CHECKPOINT).read_bytes()))
    line = one_line_error(run_cli("evaluate", run, "--no-progress"), run / CHECKPOINT)
    assert line.startswith("iclmix: error: checkpoint: ") and "not an iclmix checkpoint" in line


def test_damaged_or_foreign_checkpoints_name_the_file(tmp_path, trained):
    good = load_checkpoint(trained / CHECKPOINT)
    model_only = good["model"]  # a bare state dict, as another project would save it
    no_hash = {k: v for k, v in good.items() if k != "config_hash"}
    wrong_model = {**good, "model_config": {**good["model_config"], "n_embd": 16}}
    foreign = {"model_only": model_only, "list": [1, 2], "no_hash": no_hash, "wrong_model": wrong_model,
               "bad_step": {**good, "step": "ten"}}
    expect = {"model_only": "no step", "list": "holds a list", "no_hash": "no config_hash",
              "wrong_model": "model does not load", "bad_step": "step is a str"}
    for name, obj in foreign.items():
        run = tmp_path / name
        run.mkdir()
        torch.save(obj, run / CHECKPOINT)
        with pytest.raises(ConfigError) as err:
            load_model(run)
        assert err.value.field == "checkpoint" and str(run / CHECKPOINT) in err.value.message
        assert expect[name] in err.value.message and "\n" not in str(err.value)
    for kind in ("truncated", "empty", "text", "random"):
        path = tmp_path / f"{kind}.pt"
        path.write_bytes(damaged(kind, (trained / CHECKPOINT).read_bytes()))
        with pytest.raises(ConfigError, match="not an iclmix checkpoint"):
            load_checkpoint(path)
    cfg, run = validate_run_config(tiny()), tmp_path / "resume"
    run.mkdir()
    torch.save({k: v for k, v in good.items() if k not in ("optimizer", "data_rng")}, run / CHECKPOINT)
    with pytest.raises(ConfigError, match="no optimizer, data_rng"):  # a resume needs the training state too
        train(cfg, run, resume=True, progress=False)
    torch.save({**good, "optimizer": {"state": {}, "param_groups": []}}, run / CHECKPOINT)
    with pytest.raises(ConfigError, match="state does not load"):
        train(cfg, run, resume=True, progress=False)


def test_a_real_checkpoint_is_plain_data_and_loads(trained):
    ckpt = torch.load(trained / CHECKPOINT, weights_only=True)  # torch's own safe loader, no allow-list
    assert ckpt["step"] == 20 and ckpt["config_hash"] == validate_run_config(tiny()).config_hash
    assert ckpt["extra"] == {"mlflow_run_id": "abc", "origin": str(trained), "pair": (1, 2.5)}
    assert set(ckpt["metrics"]) == {"loss", "lr", "n_dims", "n_points"}
    model, cfg = load_model(trained)
    assert cfg.config_hash == ckpt["config_hash"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name
    r = run_cli("evaluate", trained, "--no-progress")
    assert r.returncode == 0 and "evaluation:" in r.stdout, r.stderr


def test_a_failed_write_leaves_no_temp_file_and_the_old_checkpoint(tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    for name in (CHECKPOINT, CONFIG):
        (run / name).write_bytes((trained / name).read_bytes())
    before = sorted(os.listdir(run))
    with pytest.raises((pickle.PicklingError, AttributeError)):  # fails once the temp file exists
        atomic_torch_save({"model": torch.zeros(100_000), "hook": lambda: None}, run / CHECKPOINT)
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(run / CONFIG, "seed: 0\n\ud800")
    assert sorted(os.listdir(run)) == before
    assert (run / CONFIG).read_bytes() == (trained / CONFIG).read_bytes()
    assert load_model(run)[1].config_hash == validate_run_config(tiny()).config_hash


def limit_file_size(limit: int):
    """A preexec_fn: files the process writes may not grow past `limit` bytes (a full disk, for one process)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def cut_twenty_step_run(run: Path) -> bytes:
    """`run` as a 20-step run cut at its step-10 checkpoint; returns that checkpoint's bytes."""
    cfg20 = validate_run_config(tiny())
    train(validate_run_config(tiny(steps=10)), run, progress=False)
    ckpt = load_checkpoint(run / CHECKPOINT)
    ckpt["config"], ckpt["config_hash"] = cfg20.to_dict(), cfg20.config_hash
    atomic_torch_save(ckpt, run / CHECKPOINT)
    return (run / CHECKPOINT).read_bytes()


def test_disk_full_during_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path):
    # A 20-step run cut at its step-10 checkpoint, then resumed where no file may grow to a checkpoint's size.
    run = tmp_path / "run"
    saved = cut_twenty_step_run(run)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny()))
    args = [sys.executable, "-m", "iclmix", "train", str(tmp_path / "c.yaml"), "--out", str(run), "--resume",
            "--no-progress"]
    r = subprocess.run(args, cwd=ROOT, env={**cli_env(), "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True,
                       text=True, timeout=300, preexec_fn=limit_file_size(len(saved) // 2))
    line = one_line_error(r, run / CHECKPOINT)
    assert "cannot write" in line and "--resume" in line
    assert sorted(os.listdir(run)) == sorted([CHECKPOINT, CONFIG, "metrics.csv"])  # no temp file
    assert (run / CHECKPOINT).read_bytes() == saved and load_checkpoint(run / CHECKPOINT)["step"] == 10
    r = run_cli("train", tmp_path / "c.yaml", "--out", run, "--resume", "--no-progress")
    assert r.returncode == 0 and "trained 20 steps" in r.stdout, r.stderr
    assert load_checkpoint(run / CHECKPOINT)["step"] == 20


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs: a real file system that fills up (skipped only where this machine forbids mounting)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_file_system_during_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, small_tmpfs):
    run = small_tmpfs / "run"
    saved = cut_twenty_step_run(run)
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (free - len(saved) // 2))  # room for the metrics, not for another checkpoint
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny()))
    r = run_cli("train", tmp_path / "c.yaml", "--out", run, "--resume", "--no-progress")
    line = one_line_error(r, run / CHECKPOINT)
    assert "cannot write" in line and "No space left" in line and "--resume" in line
    assert sorted(os.listdir(run)) == sorted([CHECKPOINT, CONFIG, "metrics.csv"])  # no temp file
    assert (run / CHECKPOINT).read_bytes() == saved and load_checkpoint(run / CHECKPOINT)["step"] == 10
    filler.unlink()  # space freed: the same command finishes the run
    r = run_cli("train", tmp_path / "c.yaml", "--out", run, "--resume", "--no-progress")
    assert r.returncode == 0 and "trained 20 steps" in r.stdout, r.stderr
    assert load_checkpoint(run / CHECKPOINT)["step"] == 20
