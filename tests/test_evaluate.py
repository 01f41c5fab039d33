"""Evaluation: the tidy table, the same prompts for every estimator, and the CLI paths to eval.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import run_cli

from icl_core.config import validate_run_config
from icl_core.evaluate import EVAL_FIELDS, bootstrap_mean_ci, estimator_predictors, evaluate_predictors
from icl_core.families import Linear, SparseLinear, build_mixture


def test_table_has_one_row_per_task_k_estimator_and_sane_values():
    mix = build_mixture([{"family": "linear", "weight": 0.5}, {"family": "sparse_linear", "nnz": 1, "weight": 0.5}])
    names = ["zero", "averaging", "ols", "ridge", "lasso", "knn", "bayes_pretrain", "bayes_task"]
    tasks = [Linear(), SparseLinear(nnz=1)]
    rows = evaluate_predictors(
        {}, tasks, dim=4, n_points=9, n_prompts=400, seed=7,
        make_predictors=lambda task: estimator_predictors(names, task, mix, 0.0),
    )
    df = pd.DataFrame(rows)
    assert list(df.columns) == list(EVAL_FIELDS)
    assert len(df) == 2 * 9 * len(names) and not df.duplicated(["task", "k", "estimator"]).any()
    assert set(df.task) == {"linear", "sparse_linear(nnz=1)"}
    assert (df.ci_low <= df.error).all() and (df.error <= df.ci_high).all() and (df.n_prompts == 400).all()
    err = df.set_index(["task", "estimator", "k"]).error.sort_index()
    # Zero predictor ~ 1 everywhere (unit-variance families); least squares exact once k >= d.
    assert np.allclose(err.loc[("linear", "zero")], 1, atol=0.2)
    assert err.loc[("linear", "ols")].loc[4:].max() < 1e-6
    # Every estimator sees the same prompts: at k = 0 nothing is known and all predict 0.
    k0 = df[df.k == 0].groupby("task").error.nunique()
    assert (k0 == 1).all()


def test_same_seed_same_prompts_and_a_different_seed_differs():
    preds = {"zero": lambda xs, ys: torch.zeros_like(ys)}
    a = evaluate_predictors(preds, [Linear()], dim=3, n_points=5, n_prompts=64, seed=1)
    b = evaluate_predictors(preds, [Linear()], dim=3, n_points=5, n_prompts=64, seed=1)
    c = evaluate_predictors(preds, [Linear()], dim=3, n_points=5, n_prompts=64, seed=2)
    assert a == b and a != c


def test_bootstrap_interval_is_a_90_percent_band():
    rng = np.random.default_rng(0)
    errors = rng.exponential(size=(1280, 1))
    mean, low, high = bootstrap_mean_ci(errors)
    se = errors.std() / np.sqrt(1280)
    assert high[0] - low[0] == pytest.approx(2 * 1.645 * se, rel=0.15)
    assert low[0] < mean[0] < high[0]


def test_train_with_eval_section_writes_eval_csv(tmp_path, example_config):
    r = run_cli("train", example_config, "--out", tmp_path / "run", "--no-progress",
                "--set", "train.steps=20", "--set", "eval.n_prompts=64")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "run" / "eval.csv")
    assert list(df.columns) == list(EVAL_FIELDS)
    assert set(df.task) == {"linear", "sparse_linear(nnz=1)", "sparse_linear(nnz=3)"}
    assert set(df.estimator) == {"model", "zero", "averaging", "ols", "ridge", "lasso", "knn",
                                 "bayes_pretrain", "bayes_task"}
    assert set(df.k) == set(range(11)) and (df.n_prompts == 64).all()


def test_evaluate_command_with_tasks_file_and_prompt_count(tmp_path, example_config):
    cfg = yaml.safe_load(example_config.read_text())
    cfg["train"]["steps"] = 10
    cfg["eval"] = {"n_prompts": 32, "estimators": ["model", "zero", "ols", "bayes_task"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run", "--no-progress").returncode == 0
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [{"family": "sparse_linear", "nnz": 2},
                                               {"family": "sine", "freq_lo": 0.5, "freq_hi": 1.0}]}))
    r = run_cli("evaluate", tmp_path / "run", "--tasks", tasks, "--n-prompts", "48", "--no-progress")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "run" / "eval.csv")
    assert set(df.task) == {"sparse_linear(nnz=2)", "sine(freq_lo=0.5,freq_hi=1.0)"}
    assert set(df.estimator) == {"model", "zero", "ols", "bayes_task"} and (df.n_prompts == 48).all()

    tasks.write_text(yaml.safe_dump([{"family": "sparse_linear", "nnz": 9}]))
    r = run_cli("evaluate", tmp_path / "run", "--tasks", tasks)
    assert r.returncode == 2 and "tasks[0].nnz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("evaluate", tmp_path / "nowhere")
    assert r.returncode == 2 and "RUN_DIR" in r.stderr


def test_unknown_estimator_is_rejected(example_config):
    cfg = yaml.safe_load(example_config.read_text())
    cfg["eval"]["estimators"] = ["model", "oracle"]
    with pytest.raises(Exception) as e:
        validate_run_config(cfg)
    assert "eval.estimators[1]" in str(e.value)
