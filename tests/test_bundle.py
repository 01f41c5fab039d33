"""A bundle of K runs trains each member as it would train alone: same losses, same weights, same checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from icl_core.bundle import bundle_key, train_bundle
from icl_core.config import ConfigError, validate_run_config
from icl_core.errors import NonFiniteLossError
from icl_core.train import load_checkpoint, load_model, train

STEPS = 50


def member(seed: int, mixture: list[dict], **train_kw) -> dict:
    """A tiny run; weight decay on, so that AdamW's decoupled decay (matrices only) is compared too."""
    cfg = tiny_config(steps=STEPS, log_every=1, checkpoint_every=25, device="cpu", weight_decay=0.1, **train_kw)
    return {**cfg, "seed": seed, "data": {**cfg["data"], "mixture": mixture}}


DENSE = [{"family": "linear"}]
SPARSE = [{"family": "sparse_linear", "nnz": 1}]
MIXED = [{"family": "linear", "weight": 0.5}, {"family": "sparse_linear", "nnz": 1, "weight": 0.5}]


def three_members() -> list:
    """Three runs of one shape that differ in seed, mixture, lr schedule and clipping."""
    return [validate_run_config(c) for c in (
        member(0, DENSE),
        member(1, SPARSE, lr=3e-4, schedule="wsd", warmup_steps=5, decay_steps=20, min_lr_ratio=0.0),
        member(2, MIXED, grad_clip=0.0, schedule="cosine", warmup_steps=10),
    )]


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def assert_same_run(bundled: Path, solo: Path) -> None:
    got, want = losses(bundled), losses(solo)
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=1e-4)
    a, b = load_model(bundled)[0].state_dict(), load_model(solo)[0].state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=name)


def test_bundle_members_train_as_they_would_alone(tmp_path):
    torch.set_num_threads(1)
    cfgs = three_members()
    assert len({bundle_key(c) for c in cfgs}) == 1
    results = train_bundle(cfgs, [tmp_path / f"b{k}" for k in range(3)], progress=False)
    for k, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"s{k}", progress=False)
        assert results[k].step == STEPS
        assert_same_run(tmp_path / f"b{k}", tmp_path / f"s{k}")
        assert load_checkpoint(tmp_path / f"b{k}" / "checkpoint.pt")["config_hash"] == cfg.config_hash


class Killed(Exception):
    """Stands for a kill right after the checkpoint at step 25."""


class LoggedSteps:
    """Records the steps a run logs (a resumed run must start logging at 26, not at 1)."""

    def __init__(self):
        self.steps: list[int] = []

    def on_log(self, step: int, metrics: dict) -> None:
        self.steps.append(step)

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        pass


class KillAt25:
    def on_log(self, step: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        if step == 25:
            raise Killed


def test_a_killed_bundle_resumes_as_a_bundle_or_as_solo_runs_and_solo_runs_as_a_bundle(tmp_path):
    torch.set_num_threads(1)
    cfgs = three_members()
    for k, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"s{k}", progress=False)
    for name in ("bundle_then_bundle", "bundle_then_solo"):
        dirs = [tmp_path / name / str(k) for k in range(3)]
        with pytest.raises(Killed):  # the last member's hook fires after every member saved step 25
            train_bundle(cfgs, dirs, callbacks=[(), (), (KillAt25(),)], progress=False)
        assert [load_checkpoint(d / "checkpoint.pt")["step"] for d in dirs] == [25, 25, 25]
        logged = [LoggedSteps() for _ in dirs]
        if name == "bundle_then_bundle":
            train_bundle(cfgs, dirs, resume=True, progress=False, callbacks=[[log] for log in logged])
        else:
            for cfg, d, log in zip(cfgs, dirs, logged, strict=True):
                train(cfg, d, resume=True, progress=False, callbacks=[log])
        for k, d in enumerate(dirs):
            assert logged[k].steps == list(range(26, STEPS + 1))  # resumed at its checkpoint, not retrained
            assert_same_run(d, tmp_path / f"s{k}")
    dirs = [tmp_path / "solo_then_bundle" / str(k) for k in range(3)]
    for cfg, d in zip(cfgs, dirs, strict=True):
        with pytest.raises(Killed):
            train(cfg, d, callbacks=[KillAt25()], progress=False)
    logged = [LoggedSteps() for _ in dirs]
    train_bundle(cfgs, dirs, resume=True, progress=False, callbacks=[[log] for log in logged])
    for k, d in enumerate(dirs):
        assert logged[k].steps == list(range(26, STEPS + 1))
        assert_same_run(d, tmp_path / f"s{k}")


def test_members_at_different_steps_resume_as_one_bundle_the_ones_ahead_waiting(tmp_path):
    """A kill between members' saves leaves them at different steps: they still train as one bundle, each
    resuming at its own checkpoint, and each ends as its solo run."""
    torch.set_num_threads(1)
    cfgs = three_members()
    for k, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"s{k}", progress=False)
    dirs = [tmp_path / "staggered" / str(k) for k in range(3)]
    with pytest.raises(Killed):
        train(cfgs[0], dirs[0], callbacks=[KillAt25()], progress=False)  # at step 25
    train(cfgs[2], dirs[2], progress=False)  # done training (killed while evaluating, say); member 1 is fresh
    logged = [LoggedSteps() for _ in dirs]
    results = train_bundle(cfgs, dirs, resume=True, progress=False, callbacks=[[log] for log in logged])
    assert [log.steps for log in logged] == [list(range(26, STEPS + 1)), list(range(1, STEPS + 1)), []]
    for k, d in enumerate(dirs):
        assert results[k].step == STEPS
        assert_same_run(d, tmp_path / f"s{k}")
        want = load_model(d)[0].state_dict()  # what evaluation gets is what was saved
        for name, value in results[k].model.state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


def test_a_member_whose_loss_turns_non_finite_is_frozen_and_the_others_go_on(tmp_path):
    torch.set_num_threads(1)
    cfgs = three_members()
    blowup = validate_run_config(member(1, SPARSE, lr=1e30, grad_clip=0.0))
    results = train_bundle([cfgs[0], blowup, cfgs[2]], [tmp_path / f"b{k}" for k in range(3)], progress=False)
    assert isinstance(results[1], NonFiniteLossError)
    assert 1 < results[1].step <= 10
    assert len(losses(tmp_path / "b1")) < results[1].step  # no row from the non-finite step on
    for k in (0, 2):
        train(cfgs[k], tmp_path / f"s{k}", progress=False)
        assert_same_run(tmp_path / f"b{k}", tmp_path / f"s{k}")


def test_a_member_frozen_after_its_checkpoint_keeps_that_checkpoint_and_resumes_from_it(tmp_path, monkeypatch):
    """A blow-up between checkpoints: the frozen member's last good checkpoint stays on disk (later saves of the
    bundle skip it), its metrics stop before the bad step, and a rerun resumes it there to its solo run's end."""
    import icl_core.bundle as bundle

    torch.set_num_threads(1)
    cfgs = three_members()
    dirs = [tmp_path / f"b{k}" for k in range(3)]
    calls = []
    sample = bundle.sample_prompts

    def poisoned(*args, **kwargs):  # member 1's targets turn infinite at step 31, after its checkpoint at 25
        xs, ys = sample(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3 * 30 + 2:
            ys = ys.clone()
            ys[0, 0] = float("inf")
        return xs, ys

    monkeypatch.setattr(bundle, "sample_prompts", poisoned)
    results = train_bundle(cfgs, dirs, progress=False)
    assert isinstance(results[1], NonFiniteLossError) and results[1].step == 31
    assert load_checkpoint(dirs[1] / "checkpoint.pt")["step"] == 25  # not overwritten at 50
    assert len(losses(dirs[1])) == 30  # no row from the non-finite step on
    for k, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"s{k}", progress=False)
    for k in (0, 2):
        assert results[k].step == STEPS
        assert_same_run(dirs[k], tmp_path / f"s{k}")

    monkeypatch.setattr(bundle, "sample_prompts", sample)
    logged = [LoggedSteps() for _ in dirs]
    results = train_bundle(cfgs, dirs, resume=True, progress=False, callbacks=[[log] for log in logged])
    assert [log.steps for log in logged] == [[], list(range(26, STEPS + 1)), []]
    assert all(r.step == STEPS for r in results)
    for k, d in enumerate(dirs):
        assert_same_run(d, tmp_path / f"s{k}")


def test_a_bundle_whose_training_members_froze_stops_instead_of_idling_to_the_end(tmp_path, monkeypatch):
    import icl_core.bundle as bundle

    torch.set_num_threads(1)
    done = three_members()[0]
    train(done, tmp_path / "done", progress=False)
    blowup = validate_run_config(member(1, SPARSE, lr=1e30, grad_clip=0.0))
    draws = []
    sample = bundle.sample_prompts
    monkeypatch.setattr(bundle, "sample_prompts", lambda *a, **kw: draws.append(1) or sample(*a, **kw))
    results = train_bundle([done, blowup], [tmp_path / "done", tmp_path / "blowup"], resume=True, progress=False)
    assert isinstance(results[1], NonFiniteLossError) and results[0].step == STEPS
    assert len(draws) <= results[1].step + 1  # no batches drawn once the only training member froze
    want = load_model(tmp_path / "done")[0].state_dict()
    for name, value in results[0].model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


def test_runs_of_different_shapes_do_not_bundle(tmp_path):
    a = validate_run_config(member(0, DENSE))
    b = validate_run_config(member(1, DENSE, batch_size=16))
    assert bundle_key(a) != bundle_key(b)
    with pytest.raises(ConfigError, match="^bundle: "):
        train_bundle([a, b], [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "a").exists()


def test_a_bundle_refuses_to_move_its_parameters_off_their_shared_tensor():
    from icl_core.model import BundledTransformer
    from icl_core.train import build_model

    cfgs = three_members()
    bundle = BundledTransformer([build_model(c) for c in cfgs])
    before = {n: bundle.stacked(n).detach().clone() for n in bundle.names}
    with torch.no_grad():
        bundle.flat.add_(1.0)  # the optimizer writes `flat`: every parameter must see it
    for n in bundle.names:
        torch.testing.assert_close(bundle.stacked(n).detach(), before[n] + 1.0, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="build them on the device"):
        bundle.to("cpu")
