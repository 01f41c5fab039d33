"""Function families: canonical ids, registry errors and sampler statistics."""

from __future__ import annotations

import math

import pytest
import torch

from icl_core.errors import ConfigError
from icl_core.families import (
    FAMILIES,
    Convex,
    Linear,
    Mixture,
    ReluNet,
    Sine,
    SparseLinear,
    build_family,
    build_mixture,
    sample_prompts,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_canonical_ids_round_trip_through_config_data():
    specs = [
        {"family": "linear"},
        {"family": "sparse_linear", "nnz": 3},
        {"family": "sine", "freq_lo": 1, "freq_hi": 2.5},
        {"family": "relu_net", "hidden": 100},
        {"family": "convex", "a": {"family": "linear"}, "b": {"family": "sine"}, "alpha": 0.25},
    ]
    ids = [build_family(s).canonical_id for s in specs]
    assert ids == [
        "linear",
        "sparse_linear(nnz=3)",
        "sine(freq_lo=1.0,freq_hi=2.5)",
        "relu_net(hidden=100)",
        "convex(a=linear,b=sine(freq_lo=0.5,freq_hi=2.0),alpha=0.25)",
    ]
    for s in specs:
        fam = build_family(s)
        assert build_family(fam.to_spec()) == fam
    mix = build_mixture([{"family": "linear", "weight": 0.5}, {"family": "sparse_linear", "nnz": 1, "weight": 0.5}])
    assert mix.canonical_id == "mixture(0.5*linear+0.5*sparse_linear(nnz=1))"
    assert build_mixture(mix.to_spec()) == mix
    assert mix.weight_of("sparse_linear(nnz=1)") == 0.5 and mix.weight_of("sine") == 0.0


def test_registry_makes_new_families_one_class_away():
    assert {"linear", "sparse_linear", "sine", "relu_net", "convex"} <= set(FAMILIES)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"family": "cubic"}, "family"),
        ({}, "family"),
        ({"family": "sparse_linear", "nnz": 0}, "nnz"),
        ({"family": "sparse_linear", "k": 2}, "k"),
        ({"family": "sine", "freq_lo": 3, "freq_hi": 1}, "freq_hi"),
        ({"family": "convex", "a": {"family": "linear"}, "b": {"family": "nope"}}, "b.family"),
        ({"family": "convex", "a": {"family": "linear"}, "b": {"family": "linear"}, "alpha": 2}, "alpha"),
        ({"family": "convex", "a": {"family": "linear"}}, "b"),
    ],
)
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ConfigError) as e:
        build_family(spec)
    assert e.value.field == field


@pytest.mark.parametrize(
    "entries, field",
    [
        ([{"family": "linear", "weight": 0.5}, {"family": "sine", "weight": 0.4}], "weight"),
        ([{"family": "linear", "weight": -0.5}, {"family": "sine", "weight": 1.5}], "[0].weight"),
        ([{"family": "linear", "weight": 0.5}, {"family": "sine"}], "[1].weight"),
        ([{"family": "linear"}, {"family": "linear"}], "family"),
        ([], "mixture"),
    ],
)
def test_bad_mixtures_name_the_field(entries, field):
    with pytest.raises(ConfigError) as e:
        build_mixture(entries)
    assert e.value.field == field


def test_nnz_above_dim_is_rejected():
    with pytest.raises(ConfigError, match="nnz=6 exceeds"):
        SparseLinear(nnz=6).check(5)


@pytest.mark.parametrize(
    "family",
    [Linear(), SparseLinear(nnz=2), Sine(0.5, 2.0), ReluNet(hidden=100), Convex(Linear(), Sine(), alpha=0.3)],
    ids=lambda f: f.canonical_id,
)
def test_unit_output_variance(family):
    xs, ys = sample_prompts(family, batch=4000, n_points=8, dim=10, generator=gen(1))
    var = ys.square().mean().item()
    # Each prompt is one function: the variance estimate's spread comes from 4000 functions.
    assert abs(var - 1.0) < 0.08, var
    assert abs(ys.mean().item()) < 0.05


def test_sparse_functions_have_exactly_nnz_nonzeros_inside_the_active_coordinates():
    fn = SparseLinear(nnz=3).sample(2000, 20, gen(2), active_dim=8)
    nnz = (fn.w != 0).sum(dim=1)
    assert torch.all(nnz == 3)
    assert torch.all(fn.w[:, 8:] == 0)
    # Supports are uniform over the active coordinates.
    counts = (fn.w[:, :8] != 0).float().mean(dim=0)
    assert torch.allclose(counts, torch.full((8,), 3 / 8), atol=0.05)


def test_inactive_dimensions_are_zero_in_prompts():
    xs, ys = sample_prompts(Linear(), batch=16, n_points=5, dim=10, generator=gen(3), active_dim=4)
    assert torch.all(xs[:, :, 4:] == 0) and torch.all(xs[:, :, :4] != 0)
    assert abs(ys.square().mean().item() - 1) < 0.5


def test_mixture_proportions_follow_weights():
    mix = Mixture((Linear(), SparseLinear(nnz=1), Sine()), (0.2, 0.5, 0.3))
    fn = mix.sample(20000, 5, gen(4))
    freq = torch.bincount(fn.component, minlength=3).float() / 20000
    sd = math.sqrt(0.25 / 20000)
    assert torch.allclose(freq, torch.tensor([0.2, 0.5, 0.3]), atol=5 * sd)
    xs, ys = sample_prompts(mix, batch=20000, n_points=4, dim=5, generator=gen(4))
    assert abs(ys.square().mean().item() - 1) < 0.05


def test_zero_weight_components_are_never_drawn():
    mix = Mixture((Linear(), SparseLinear(nnz=1)), (0.0, 1.0))
    fn = mix.sample(500, 5, gen(5))
    assert torch.all(fn.component == 1)


def test_observation_noise_adds_its_variance():
    _, clean = sample_prompts(Linear(), 4000, 8, 5, gen(6))
    _, noisy = sample_prompts(Linear(), 4000, 8, 5, gen(6), noise_std=0.5)
    assert abs((noisy - clean).square().mean().item() - 0.25) < 0.02


def test_sampling_is_reproducible_from_the_generator():
    a = sample_prompts(Mixture((Linear(), Sine()), (0.5, 0.5)), 32, 6, 4, gen(7))
    b = sample_prompts(Mixture((Linear(), Sine()), (0.5, 0.5)), 32, 6, 4, gen(7))
    c = sample_prompts(Mixture((Linear(), Sine()), (0.5, 0.5)), 32, 6, 4, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
