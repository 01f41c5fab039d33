"""Benchmarks: the HF GPT-2 comparator computes our model's function; the benchmarks run at tiny size."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli_env

if str(ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import bundle_speed  # noqa: E402
from icl_core.model import ICLTransformer, ModelConfig  # noqa: E402

TINY = ModelConfig(dim=5, max_points=11, n_layer=2, n_head=4, n_embd=32)


@pytest.mark.parametrize("attn", [None, "eager"])
def test_comparator_weights_loaded_into_ours_give_the_same_predictions(attn):
    pytest.importorskip("transformers")
    from bench.comparator import HFGPT2Learner, load_into

    torch.manual_seed(0)
    hf = HFGPT2Learner(TINY, attn_implementation=attn)
    # Move every weight off its init (zero biases, unit LayerNorm gains) so a mis-mapped tensor shows.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = load_into(hf, ICLTransformer(TINY))
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(16, 11, 5, generator=g), torch.randn(16, 11, generator=g)
    with torch.no_grad():
        theirs = hf.eval()(xs, ys)
    mine = ours.predict(xs, ys)
    assert mine.shape == theirs.shape == (16, 11)
    assert (mine - theirs).abs().max().item() < 1e-5
    assert theirs.std() > 0.1  # not a degenerate comparison
    # Shorter prompts use the leading positions of both models alike.
    with torch.no_grad():
        assert torch.allclose(ours.predict(xs[:, :4], ys[:, :4]), hf(xs[:, :4], ys[:, :4]), atol=1e-5, rtol=0)


def test_load_into_rejects_a_different_shape():
    pytest.importorskip("transformers")
    from bench.comparator import HFGPT2Learner, load_into

    with pytest.raises(ValueError, match="configs differ"):
        load_into(HFGPT2Learner(TINY), ICLTransformer(ModelConfig(dim=5, max_points=11, n_layer=1, n_embd=32)))


def test_train_speed_times_ours_the_comparator_and_levers_at_tiny_size():
    pytest.importorskip("transformers")
    from bench import train_speed

    res = train_speed.levers("tiny", ["no_clip", "preallocated_data", "fused_adam"], rounds=1, steps=1)
    for name in ("ours", "hf_gpt2", "no_clip", "preallocated_data", "fused_adam", "torch.mm"):
        assert any(k.startswith(name) for k in res["contenders"]), name
    ours = res["contenders"]["ours"]
    assert ours["wall"]["steps_per_s"] > 0 and 0 < ours["cpu"]["mfu"] < 2
    assert set(res["speedup_vs_ours"]["wall"]) == {"hf_gpt2", "no_clip", "preallocated_data", "fused_adam"}
    assert "fused_adam" in train_speed.format_table([res], "cpu")


def test_preallocated_prompts_are_dense_linear_prompts():
    from bench.train_speed import BATCH, DIM, POINTS, preallocated_prompts

    xs, ys = preallocated_prompts(0)()
    assert xs.shape == (BATCH, POINTS, DIM) and ys.shape == (BATCH, POINTS)
    w = torch.linalg.lstsq(xs[0], ys[0]).solution
    assert torch.allclose(xs[0] @ w, ys[0], atol=1e-4)  # exactly linear in x
    assert 0.3 < ys.var().item() < 3.0  # unit variance, as the families are scaled


def test_gpu_benchmark_runs_on_cpu_at_tiny_size(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--tiny", "--device", "cpu", "--trials", "1", "2", "--steps", "3",
         "--repeats", "1", "--json", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["size"] == "tiny" and res["variants"]["eager"]["steps_per_s"] > 0
    assert res["variants"]["loop"]["steps_per_s"] > 0  # icl_core.train.train itself, as a trial runs it
    bundle = res["variants"]["bundle_2"]  # icl_core.bundle: two members, figures per model
    assert bundle["steps_per_s"] > 0 and 0 < bundle["mfu"] < 1
    assert res["matmul"]["tflops"] > 0 and 0 < res["variants"]["eager"]["mfu"] < 1
    assert [s["trials"] for s in res["sharing"]] == [1, 2]
    two = res["sharing"][1]
    assert len(two["per_trial_steps_per_s"]) == 2 and two["aggregate_steps_per_s"] > 0
    assert two["gpu_hours_per_500k_trial"] > 0
    assert "trials sharing" in r.stdout


def test_python_m_bench_writes_json(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "cpu.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sizes", "tiny", "--rounds", "1", "--no-eval", "--out", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] and res["date"] and res["command"].startswith("python -m bench")
    (tiny,) = res["train"]
    assert {"ours", "ours_compiled", "hf_gpt2", "hf_gpt2_eager", "gemm_floor"} <= set(tiny["contenders"])
    assert tiny["speedup_vs_hf_gpt2"]["wall"]["ours"] > 0 and tiny["speedup_vs_hf_gpt2"]["wall"]["ours_compiled"] > 0
    assert "hf_gpt2" in r.stdout
    if (os.cpu_count() or 1) >= 2:  # the two-core section, each contender in its own process
        (two,) = res["two_cores"]
        assert set(two["contenders"]) == {"ours", "ours@2", "batch_threads_2", "hf_gpt2", "hf_gpt2@2"}
        assert two["speedup_vs_best_hf"]["wall"]["batch_threads_2"] > 0 and "vs best HF" in r.stdout


def test_batched_lasso_agrees_with_sklearn():
    pytest.importorskip("sklearn")
    from bench import eval_speed

    res = eval_speed.lasso(n_prompts=8, sklearn_prompts=2)
    assert res["max_abs_prediction_diff_vs_sklearn_tol_1e-10"] < 1e-6
    assert res["sklearn_s_per_prompt"] > 0 and res["ours_s_per_prompt"] > 0


def test_full_last_layer_lever_computes_the_same_function():
    from bench.train_speed import FullLastLayer

    torch.manual_seed(0)
    ours = ICLTransformer(TINY)
    lever = FullLastLayer(TINY)
    lever.load_state_dict(ours.state_dict())
    xs, ys = torch.randn(4, 11, 5), torch.randn(4, 11)
    assert torch.allclose(lever.predict(xs, ys), ours.predict(xs, ys), atol=1e-6, rtol=0)


def test_gpu_checks_judge_trials_from_mlflow_rows():
    from bench.gpu_checks import check, max_concurrency

    def row(i, start, end, **kw):
        return {"run_id": f"{i:08d}", "status": "FINISHED", "hash": str(i), "device": "cuda:0",
                "fraction": "0.25", "cap_gib": 34.9, "peak_gib": 0.2, "start": start, "end": end, **kw}

    packed = [row(i, 0.0 + i, 10.0 + i) for i in range(4)]
    assert max_concurrency(packed) == 4 and check(packed, 0.25, 4) == []
    one_by_one = [row(i, 10.0 * i, 10.0 * i + 9) for i in range(4)]
    assert max_concurrency(one_by_one) == 1
    assert check(one_by_one, 0.25, 4) == ["no two trials ran on the GPU at the same time"]
    bad = packed[:3] + [row(3, 0, 5, device="cpu", fraction=None, peak_gib=40.0, status="FAILED")]
    problems = check(bad, 0.25, 4)
    assert any("status FAILED" in p for p in problems) and any("not CUDA" in p for p in problems)
    assert any("fraction None" in p for p in problems) and any("not under its cap" in p for p in problems)
    assert check(packed[:3], 0.25, 4)[0].startswith("expected 4 trial runs")


def test_gemm_floor_replays_the_matrix_multiplies_of_our_step():
    from bench.train_speed import BATCH, POINTS, gemm_calls, gemm_floor, gemm_flops, model_config, ours

    cfg = model_config("tiny")
    step = ours(cfg)
    step()
    calls = gemm_calls(step)
    # Forward: read-in, 4 per block, read-out and the prompts' x @ w; backward: a dW per Linear and a dX for
    # each but the read-in (its input needs no gradient).
    linears = 2 + 4 * cfg.n_layer
    assert len(calls) == 3 * linears - 1 + 1
    # Their FLOPs are the linear part of the model FLOPs (3 x forward), less the read-in's dX, plus the data's.
    n, T = POINTS, 2 * POINTS - 1
    model = ICLTransformer(cfg)
    attention = 3 * ((cfg.n_layer - 1) * 2 * T * T * cfg.n_embd + 2 * n * T * cfg.n_embd) * BATCH
    linear = model.flops_per_step(POINTS, BATCH) - attention
    expected = linear - 2 * BATCH * T * cfg.dim * cfg.n_embd + 2 * BATCH * n * cfg.dim
    assert gemm_flops(calls) == pytest.approx(expected, rel=1e-9)
    floor = gemm_floor(step)
    assert floor.flops == gemm_flops(calls)
    floor.step()  # replays on random data of the same layouts


@pytest.mark.parametrize("bounds", [(0, 21), (0, 11, 21), (0, 7, 14, 21)])
def test_chunked_attention_experiment_is_causal_attention_forward_and_backward(bounds):
    """The query-chunk attention timed in `bench.micro --parts attention_chunks_ms` computes what SDPA does."""
    from bench.micro import ChunkedCausalAttention, sdpa_on_fused

    torch.manual_seed(0)
    qkv = torch.randn(3, 21, 96, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 21, 32, dtype=torch.float64)
    want = sdpa_on_fused(qkv, 2)
    (want_grad,) = torch.autograd.grad(want, qkv, g)
    got = ChunkedCausalAttention.apply(qkv, 2, bounds)
    (got_grad,) = torch.autograd.grad(got, qkv, g)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10)
    # Causal: a later token's q, k or v moves no earlier output.
    moved = qkv.detach().clone()
    moved[:, 15:] += 1.0
    torch.testing.assert_close(ChunkedCausalAttention.apply(moved, 2, bounds)[:, :15], got.detach()[:, :15])


def test_written_out_attention_experiment_is_causal_attention_forward_and_backward():
    """The attention `bench.micro --parts attention_compiled_ms` hands to inductor computes what SDPA does."""
    from bench.micro import explicit_on_fused, sdpa_on_fused

    torch.manual_seed(0)
    qkv = torch.randn(3, 21, 96, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 21, 32, dtype=torch.float64)
    want = sdpa_on_fused(qkv, 2)
    got = explicit_on_fused(qkv, 2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got, qkv, g)[0], torch.autograd.grad(want, qkv, g)[0],
                               atol=1e-12, rtol=1e-10)


def test_solo_runs_each_contender_in_its_own_process_at_its_thread_count():
    pytest.importorskip("transformers")
    from bench import train_speed

    res = train_speed.solo("tiny", ["ours", "batch_threads_2", "hf_gpt2", "hf_gpt2@2"], rounds=2, steps=1)
    assert res["solo"] and set(res["contenders"]) == {"ours", "batch_threads_2", "hf_gpt2", "hf_gpt2@2"}
    assert len(res["contenders"]["ours"]["cpu"]["per_round"]) == 2
    assert res["contenders"]["hf_gpt2@2"]["threads"] == 2
    # each child warms up before timing and reports the page faults of its timed steps
    assert res["warmup"] == train_speed.WARMUP["tiny"]
    assert all(len(c["page_faults_per_step"]) == 2 and min(c["page_faults_per_step"]) >= 0
               for c in res["contenders"].values())
    assert res["speedup_vs_hf_gpt2"]["cpu"]["ours"] > 0
    # against the faster HF setting of each round: never more than against either one alone
    best = res["speedup_vs_best_hf"]["wall"]
    assert set(best) == {"ours", "batch_threads_2"}
    assert best["ours"] <= res["speedup_vs_hf_gpt2"]["wall"]["ours"] + 1e-12
    assert "vs best HF" in train_speed.format_table([res], "wall")
    with pytest.raises(argparse.ArgumentTypeError):
        train_speed.solo_spec("hf_gpt2@two")


def test_bundle_benchmark_times_bundled_against_separate_trials_of_the_same_configs(tmp_path):
    out = tmp_path / "bundle.json"
    tiny = json.dumps({"data": {"dim": 2, "n_points": 6}, "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
                       "train": {"batch_size": 8}})
    r = subprocess.run(
        [sys.executable, "-m", "bench.bundle_speed", "--sizes", tiny, "quickstart", "--ks", "1", "3", "--steps", "2",
         "--workers", "2", "--ops-size", tiny, "--ops-ks", "1", "4", "--json", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    rows, ops = result["rows"], result["ops_per_model_step"]
    assert [(row["k"], row["workers"]) for row in rows] == [(1, 2), (3, 2)] * 2
    assert set(ops["bundled"]) == {"1", "4"} and ops["solo"] > 0
    assert ops["bundled"]["4"] < ops["solo"]  # a bundle's ops are shared by its members
    for row in rows:
        for name in ("separate", "bundled"):
            assert row[f"{name}_model_steps_per_s"] == pytest.approx(row["k"] * 2 / row[f"{name}_s"], rel=0.02)
        assert row["bundled_over_separate"] > 0
        assert 1 <= row["ceiling"] <= row["k"]
        assert row["ceiling"] == pytest.approx(bundle_speed.ceiling(row["step_ms"], row["batch_1_step_ms"], row["k"]),
                                               abs=1e-3)
    assert "ratio" in r.stdout and "ceiling" in r.stdout


@pytest.mark.parametrize("flag", ["--sizes", "--ops-size"])
def test_bundle_benchmark_names_an_unknown_size_and_exits_2(tmp_path, flag):
    cmd = [sys.executable, "-m", "bench.bundle_speed", flag, "quikstart", "--json", str(tmp_path / "b.json")]
    r = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"{flag}: 'quikstart' is neither a size (quickstart, cpu_twin, paper) "
                                             "nor a JSON base config"]
    assert not (tmp_path / "b.json").exists()


def test_bundle_ceiling_shares_only_the_fixed_step_cost():
    assert bundle_speed.ceiling(1.0, 0.0, 8) == 1.0  # all arithmetic: nothing to share
    assert bundle_speed.ceiling(1.0, 1.0, 8) == pytest.approx(8.0)  # all fixed cost: K steps for one
    assert bundle_speed.ceiling(10.0, 1.0, 8) == pytest.approx(80 / 73)


def test_device_session_rescales_the_twin_with_its_curriculum_and_decay():
    import yaml

    from bench.device_session import TWIN, rescale
    from sweeps.spec import expand, validate_sweep

    sweep = yaml.safe_load(TWIN.read_text())
    assert sweep["resources"]["bundle"] == len(expand(validate_sweep(sweep)))  # the five weights are one bundle
    half = rescale(sweep, sweep["base"]["train"]["steps"] // 2)
    train, old = half["base"]["train"], sweep["base"]["train"]
    assert train["steps"] * 2 == old["steps"] and train["warmup_steps"] * 2 == old["warmup_steps"]
    assert train["decay_steps"] * 2 == old["decay_steps"]
    assert {a["interval"] * 2 for a in half["base"]["data"]["curriculum"].values()} == \
        {a["interval"] for a in sweep["base"]["data"]["curriculum"].values()}
    for steps in (500, 3_000, 40_000):  # every size the session may pick is a valid sweep, curriculum done by half-way
        cfg = expand(validate_sweep(rescale(sweep, steps)))[0].config
        assert cfg.train.steps == steps and 15 * cfg.data.curriculum.dims.interval <= steps // 2


@pytest.mark.slow
def test_device_session_runs_every_stage_at_tiny_size(tmp_path):
    import tarfile

    import pandas as pd
    import yaml

    r = subprocess.run([sys.executable, "-m", "bench.device_session", "--tiny", "--out", str(tmp_path),
                        "--budget-s", "80", "--bench-s", "40", "--reserve-s", "40"],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "device-session.json").read_text())
    assert summary["bench"]["rc"] == 0 and summary["twin"]["sweep"]["rc"] == 0
    assert all(summary["twin"][s]["rc"] == 0 for s in ("heatmap", "curves", "report", "export"))
    assert summary["twin"]["check"]["rc"] in (0, 1)  # a verdict, PASS or FAIL
    assert "bundle_2" in json.loads((tmp_path / "gpu-bundles.json").read_text())["variants"]
    twin = yaml.safe_load((tmp_path / "twin.yaml").read_text())  # what ran: the shipped file, rescaled
    assert twin["base"]["train"]["steps"] == summary["twin"]["steps"] and twin["resources"]["bundle"] == 5
    frame = pd.read_csv(tmp_path / "twin-frame.csv")
    assert frame["run_id"].nunique() == 5 and set(frame["estimator"]) >= {"model", "bayes_pretrain"}
    assert (tmp_path / "twin-check.txt").read_text().strip().splitlines()[-1] in ("PASS", "FAIL")
    with tarfile.open(tmp_path / "twin-figures.tar.gz") as tar:
        assert any(n.endswith(".png") and "heatmap" in n for n in tar.getnames())
