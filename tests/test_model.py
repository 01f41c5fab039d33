"""The transformer: causality, token layout, every parameter used, paper size."""

from __future__ import annotations

import pytest
import torch

from icl_core.model import ICLTransformer, ModelConfig


def small_model(**kw) -> ICLTransformer:
    torch.manual_seed(0)
    return ICLTransformer(ModelConfig(**{"dim": 5, "max_points": 12, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}))


def test_predictions_at_i_ignore_everything_after_x_i():
    model = small_model().double()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 12, 5, generator=g, dtype=torch.float64)
    ys = torch.randn(4, 12, generator=g, dtype=torch.float64)
    base = model.predict(xs, ys)
    for i in range(12):
        xs2, ys2 = xs.clone(), ys.clone()
        xs2[:, i + 1 :] = torch.randn_like(xs2[:, i + 1 :]) * 10
        ys2[:, i:] = torch.randn_like(ys2[:, i:]) * 10  # y_i itself is the target, never an input at i
        out = model.predict(xs2, ys2)
        assert torch.equal(out[:, : i + 1], base[:, : i + 1]), i
        if i + 1 < 12:
            assert not torch.allclose(out[:, i + 1 :], base[:, i + 1 :])


def test_token_layout_is_x_then_padded_y():
    xs = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    ys = torch.tensor([[100.0, 101.0, 102.0], [200.0, 201.0, 202.0]])
    tokens = small_model(dim=4).interleave(xs, ys)
    assert tokens.shape == (2, 5, 4)
    assert torch.equal(tokens[:, 0], xs[:, 0]) and torch.equal(tokens[:, 2], xs[:, 1])
    assert torch.equal(tokens[:, 1], torch.stack([ys[:, 0], *[torch.zeros(2)] * 3], dim=1))


def test_y_channel_layout_gives_y_its_own_coordinate():
    xs = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 1
    ys = torch.tensor([[100.0, 101.0, 102.0], [200.0, 201.0, 202.0]])
    model = small_model(dim=4, layout="y_channel")
    tokens = model.interleave(xs, ys)
    assert tokens.shape == (2, 5, 5) and model.read_in.in_features == 5
    assert torch.equal(tokens[:, 0, 1:], xs[:, 0]) and torch.equal(tokens[:, 4, 1:], xs[:, 2])
    assert torch.equal(tokens[:, ::2, 0], torch.zeros(2, 3))  # x tokens leave y's channel empty
    assert torch.equal(tokens[:, 1], torch.stack([ys[:, 0], *[torch.zeros(2)] * 4], dim=1))
    assert model.predict(xs, ys).shape == (2, 3)
    with pytest.raises(ValueError, match="layout"):  # a typo must not train Garg's layout under another name
        ModelConfig(layout="y-channel")


def test_every_parameter_receives_gradient():
    model = small_model()
    xs, ys = torch.randn(8, 12, 5), torch.randn(8, 12)
    (model(xs, ys) - ys).square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_paper_size_has_about_9_5m_parameters_in_the_blocks():
    model = ICLTransformer(ModelConfig(dim=20, max_points=41, n_layer=12, n_head=8, n_embd=256))
    in_blocks = sum(p.numel() for p in model.blocks.parameters())
    assert 9.4e6 < in_blocks < 9.6e6


def test_rejects_prompts_longer_than_its_positions():
    model = small_model()
    try:
        model(torch.randn(1, 13, 5), torch.randn(1, 13))
    except ValueError as e:
        assert "max_points=12" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_compiled_model_gives_the_eager_predictions_and_gradients():
    model = small_model()
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 12, 5, generator=g), torch.randn(8, 12, generator=g)
    losses, grads = [], []
    for forward in (model, torch.compile(model)):
        model.zero_grad()
        loss = (forward(xs, ys) - ys).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
