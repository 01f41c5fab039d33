"""CUDA training paths (skipped without a GPU; run on one with `python -m pytest tests/test_cuda.py`)."""

from __future__ import annotations

import csv

import pytest
import torch

from icl_core.config import validate_run_config
from icl_core.train import CHECKPOINT, METRICS, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config(**train_kw) -> dict:
    # Warmup + cosine lr and a points curriculum that changes the prompt shape (a new graph) within the run.
    return {
        "seed": 3,
        "data": {"dim": 5, "n_points": 11,
                 "curriculum": {"points": {"start": 7, "end": 11, "inc": 2, "interval": 30}},
                 "mixture": [{"family": "linear", "weight": 0.5},
                             {"family": "sparse_linear", "nnz": 1, "weight": 0.5}]},
        "model": {"n_layer": 3, "n_head": 4, "n_embd": 64},
        "train": {"steps": 90, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "warmup_steps": 10,
                  "log_every": 1, "checkpoint_every": 45, "device": "cuda", **train_kw},
    }


def losses(run_dir) -> list[float]:
    with open(run_dir / METRICS, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def weights(run_dir) -> torch.Tensor:
    state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    return torch.cat([v.float().flatten() for v in state.values()])


def test_cuda_graph_training_follows_eager_training(tmp_path):
    for graph in (False, True):
        train(validate_run_config(config(cuda_graph=graph)), tmp_path / str(graph), progress=False)
    eager, graphed = losses(tmp_path / "False"), losses(tmp_path / "True")
    assert len(graphed) == len(eager) == 90
    diffs = [abs(a - b) / max(abs(a), 1e-3) for a, b in zip(eager, graphed)]
    w0, w1 = weights(tmp_path / "False"), weights(tmp_path / "True")
    rel = ((w1 - w0).norm() / w0.norm()).item()
    print(f"max relative loss difference {max(diffs):.2e}, relative weight difference {rel:.2e}")
    # Same kernels in the same order: only bf16 reduction order may differ, not the warm-up steps of capture.
    assert max(diffs[:5]) < 1e-3 and max(diffs) < 5e-2 and rel < 2e-2


def test_cuda_graph_run_resumes_from_its_checkpoint(tmp_path):
    constant = {"cuda_graph": True, "schedule": "constant"}  # so a 45-step run is the first half of a 90-step one
    whole = tmp_path / "whole"
    train(validate_run_config(config(**constant)), whole, progress=False)
    cut = tmp_path / "cut"
    train(validate_run_config(config(**constant, steps=45)), cut, progress=False)  # ends at the checkpoint
    cfg = validate_run_config(config(**constant))
    ckpt = torch.load(cut / CHECKPOINT, weights_only=True)
    ckpt["config"], ckpt["config_hash"] = cfg.to_dict(), cfg.config_hash  # as if the 90-step run was cut at 45
    torch.save(ckpt, cut / CHECKPOINT)
    result = train(cfg, cut, resume=True, progress=False)
    assert result.step == 90
    a, b = losses(whole), losses(cut)
    diffs = [abs(x - y) / max(abs(x), 1e-3) for x, y in zip(a, b)]
    print(f"resumed against uninterrupted: max relative loss difference {max(diffs):.2e} (after 45: "
          f"{max(diffs[45:]):.2e})")
    assert len(b) == 90 and max(diffs) < 5e-2


def test_non_finite_loss_under_cuda_graph_names_the_eager_step(tmp_path):
    from icl_core.train import NonFiniteLossError

    steps = []
    for graph in (False, True):
        cfg = validate_run_config(config(cuda_graph=graph, lr=1e30, steps=20, grad_clip=0.0, warmup_steps=0))
        with pytest.raises(NonFiniteLossError) as e:
            train(cfg, tmp_path / str(graph), progress=False)
        steps.append(e.value.step)
        assert not (tmp_path / str(graph) / CHECKPOINT).exists()  # nothing non-finite was saved
    assert steps[1] == steps[0]


def test_bundle_on_cuda_follows_its_members_trained_alone(tmp_path):
    """A bundle of three on the GPU (bf16 autocast like a solo CUDA run) tracks each member's solo run."""
    from icl_core.bundle import train_bundle

    cfgs = [validate_run_config({**config(), "seed": s}) for s in (0, 1, 2)]
    results = train_bundle(cfgs, [tmp_path / f"b{s}" for s in range(3)], progress=False)
    assert all(r.step == 90 for r in results)
    for s, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"s{s}", progress=False)
        alone, bundled = losses(tmp_path / f"s{s}"), losses(tmp_path / f"b{s}")
        assert len(bundled) == len(alone) == 90
        diffs = [abs(a - b) / max(abs(a), 1e-3) for a, b in zip(alone, bundled)]
        w0, w1 = weights(tmp_path / f"s{s}"), weights(tmp_path / f"b{s}")
        # bf16 matmuls batched differently round differently: close, not equal (as the graphed step above).
        assert max(diffs[:5]) < 1e-2 and max(diffs) < 5e-2 and ((w1 - w0).norm() / w0.norm()).item() < 2e-2
