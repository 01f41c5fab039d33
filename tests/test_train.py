"""Training: schedules, a falling loss, non-finite guard, and bit-identical resume after SIGKILL."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, cli_env, run_cli, tiny_config

from icl_core.config import TrainConfig, validate_run_config
from icl_core.train import CHECKPOINT, METRICS, lr_at, train

tiny = tiny_config


def assert_old_configs_keep_their_hashes():
    """A config that leaves the options added since at their defaults hashes as before they existed."""
    from icl_core.config import config_hash

    plain = validate_run_config(tiny())
    legacy = plain.to_dict()
    for section, key in (("train", "cuda_graph"), ("train", "batch_threads"), ("model", "layout"),
                         ("train", "decay_steps")):  # added since
        del legacy[section][key]
    assert plain.config_hash == config_hash(legacy)
    return plain


def test_lr_schedule_is_a_pure_function_of_the_step():
    const = TrainConfig(lr=1e-3, steps=100)
    assert [lr_at(s, const) for s in (0, 50, 99)] == [1e-3] * 3
    cos = TrainConfig(lr=1e-3, steps=110, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(1e-4) and lr_at(9, cos) == pytest.approx(1e-3)
    assert lr_at(10, cos) == pytest.approx(1e-3)
    assert lr_at(60, cos) == pytest.approx(0.55e-3)
    assert lr_at(110, cos) == pytest.approx(1e-4)
    lrs = [lr_at(s, cos) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    wsd = TrainConfig(lr=1e-3, steps=110, schedule="wsd", warmup_steps=10, decay_steps=40, min_lr_ratio=0.0)
    assert lr_at(9, wsd) == pytest.approx(1e-3) and lr_at(69, wsd) == pytest.approx(1e-3)
    assert lr_at(70, wsd) == pytest.approx(1e-3 * 39 / 40) and lr_at(89, wsd) == pytest.approx(0.5e-3)
    assert lr_at(109, wsd) == 0.0


def test_curriculum_grows_dims_and_points():
    cfg = validate_run_config({**tiny(), "data": {**tiny()["data"], "dim": 8, "curriculum": {
        "dims": {"start": 2, "end": 8, "inc": 1, "interval": 10},
        "points": {"start": 5, "end": 11, "inc": 2, "interval": 10}}}})
    assert [cfg.data.dims_at(s) for s in (0, 9, 10, 55, 1000)] == [2, 2, 3, 7, 8]
    assert [cfg.data.points_at(s) for s in (0, 10, 20, 30, 1000)] == [5, 7, 9, 11, 11]


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_run_loss_falls(tmp_path):
    # d = 1 leaves the in-context-learning plateau within a few hundred steps (d = 3 needs ~2 500).
    data = {"dim": 1, "n_points": 6, "mixture": [{"family": "linear"}]}
    cfg = validate_run_config({**tiny(steps=600, log_every=10, lr=3e-3, batch_size=64), "data": data})
    result = train(cfg, tmp_path / "run", progress=False)
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / "run" / METRICS)]
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert result.step == 600
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 600 and ckpt["config"] == cfg.to_dict() and ckpt["config_hash"] == cfg.config_hash
    assert {"model", "optimizer", "data_rng", "torch_rng"} <= set(ckpt)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(lr=1e30, grad_clip=0.0, steps=200)))
    r = run_cli("train", cfg, "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "non-finite" in line and "at step" in line and "Traceback" not in r.stderr


def test_compiled_training_follows_the_eager_run(tmp_path):
    # train.compile: true is the speed setting for long runs; it must train the same model, checkpoint included.
    losses, states = [], []
    for compile_ in (False, True):
        cfg = validate_run_config(tiny(steps=30, log_every=1, checkpoint_every=30, compile=compile_))
        train(cfg, tmp_path / str(compile_), progress=False)
        losses.append([float(r["loss"]) for r in read_metrics(tmp_path / str(compile_) / METRICS)])
        states.append(torch.load(tmp_path / str(compile_) / CHECKPOINT, weights_only=True)["model"])
    assert len(losses[1]) == 30
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-5)
    assert states[1].keys() == states[0].keys()  # the plain model's names, not torch.compile's wrapper's
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_existing_run_needs_resume_and_the_same_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=20, checkpoint_every=10)))
    assert run_cli("train", cfg, "--out", tmp_path / "run", "--no-progress").returncode == 0
    r = run_cli("train", cfg, "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("train", cfg, "--out", tmp_path / "run", "--resume", "--set", "seed=9", "--no-progress")
    assert r.returncode == 2 and "another config" in r.stderr
    r = run_cli("train", cfg, "--out", tmp_path / "run", "--resume", "--no-progress")
    assert r.returncode == 0 and "trained 20 steps" in r.stdout


def _start(cfg: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "iclmix", "train", str(cfg), "--out", str(out), "--resume", "--no-progress"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("batch_threads", [1, 2])
def test_sigkill_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, batch_threads):
    """SIGKILL a real training process at random steps (before the first checkpoint and between later
    ones), resume each time, and compare weights and logged losses bit for bit with an uninterrupted run."""
    steps = 300
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=steps, checkpoint_every=25, log_every=1, batch_threads=batch_threads)))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_cli("train", cfg, "--out", ref, "--no-progress").returncode == 0

    rng = random.Random(0)
    kill_at = [rng.randint(3, 20), rng.randint(40, 140), rng.randint(160, 280)]  # logged steps
    for target in kill_at:
        proc = _start(cfg, killed)
        deadline = time.monotonic() + 120
        while _rows(killed / METRICS) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _start(cfg, killed).wait() == 0

    a = torch.load(ref / CHECKPOINT, weights_only=True)
    b = torch.load(killed / CHECKPOINT, weights_only=True)
    assert a["step"] == b["step"] == steps
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    ra, rb = read_metrics(ref / METRICS), read_metrics(killed / METRICS)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [str(s) for s in range(1, steps + 1)]
    assert [(r["loss"], r["lr"]) for r in ra] == [(r["loss"], r["lr"]) for r in rb]


def test_cuda_graph_setting_trains_eagerly_on_cpu_and_keeps_old_hashes(tmp_path):
    # The same sweep file runs on a laptop: train.cuda_graph applies on CUDA only, and a config that leaves it
    # at its default keeps the hash it had before the field existed (finished trials stay finished).

    runs = []
    for graph in (False, True):
        cfg = validate_run_config(tiny(steps=20, log_every=1, checkpoint_every=20, cuda_graph=graph, device="cpu"))
        train(cfg, tmp_path / str(graph), progress=False)
        runs.append([r["loss"] for r in read_metrics(tmp_path / str(graph) / METRICS)])
    assert runs[1] == runs[0]  # bit-identical: the eager step
    plain = assert_old_configs_keep_their_hashes()
    assert validate_run_config(tiny(cuda_graph=True)).config_hash != plain.config_hash


def test_cuda_graph_and_compile_are_exclusive(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(cuda_graph=True, compile=True)))
    r = run_cli("train", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and "train.cuda_graph" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_batch_threads_train_the_same_model_and_keep_old_hashes(tmp_path):
    # train.batch_threads splits each batch over CPU threads: the same loss and gradients up to float32
    # rounding (shards of 11, 11 and 10 prompts for 3 threads), and configs without it keep their hashes.

    losses, states = [], []
    for threads in (1, 2, 3):
        cfg = validate_run_config(tiny(steps=30, log_every=1, checkpoint_every=30, batch_threads=threads))
        train(cfg, tmp_path / str(threads), progress=False)
        losses.append([float(r["loss"]) for r in read_metrics(tmp_path / str(threads) / METRICS)])
        states.append(torch.load(tmp_path / str(threads) / CHECKPOINT, weights_only=True)["model"])
    for other, state in zip(losses[1:], states[1:]):
        assert len(other) == 30 and other == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
        for name, value in states[0].items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    plain = assert_old_configs_keep_their_hashes()
    assert validate_run_config(tiny(batch_threads=2)).config_hash != plain.config_hash


def test_threaded_step_runs_each_shard_on_its_own_single_threaded_thread():
    import threading

    from icl_core.families import Linear, sample_prompts
    from icl_core.threaded_step import ThreadedStep
    from icl_core.train import build_model, build_optimizer

    cfg = validate_run_config(tiny(batch_threads=2))
    model = build_model(cfg)
    seen: list[tuple[int, int, int]] = []  # (thread, torch threads, shard size) per forward
    model.register_forward_pre_hook(
        lambda _m, args: seen.append((threading.get_ident(), torch.get_num_threads(), len(args[0]))))
    step = ThreadedStep(model, build_optimizer(model, cfg.train, torch.device("cpu")), 1.0, 2)
    xs, ys = sample_prompts(Linear(), 32, 11, 5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (model(xs, ys) - ys).square().mean().item()  # the batch loss before the step
    seen.clear()
    before = torch.get_num_threads()
    with step:  # single-threaded ops inside, the thread count put back and the shard threads ended after
        loss = step(xs, ys, cfg.train.lr)
    assert torch.get_num_threads() == before and step.pool._shutdown
    assert len({t for t, _, _ in seen}) == 2 and {(n, size) for _, n, size in seen} == {(1, 16)}
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_shard_gradients_are_summed_in_place_but_never_through_a_view():
    from icl_core.threaded_step import _sum_into

    own, other = torch.ones(3), torch.full((3,), 2.0)
    assert _sum_into(own, other) is own and own.tolist() == [3.0, 3.0, 3.0]
    base = torch.ones(3)
    for shared in (base.expand(2, 3), base[:2]):  # an expanded tensor and a view: summed into a new tensor
        total = _sum_into(shared, torch.ones(shared.shape))
        assert total.tolist() == torch.full(shared.shape, 2.0).tolist() and base.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("train_kw", [{"batch_threads": 2, "compile": True}, {"batch_threads": 40}])
def test_bad_batch_threads_exit_2_naming_the_field(tmp_path, train_kw):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(**train_kw)))
    r = run_cli("train", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and "train.batch_threads" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
