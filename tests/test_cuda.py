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
