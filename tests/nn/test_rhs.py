"""Right-hand-side network blocks: context split, normalization, priors, UDE composition."""

from __future__ import annotations

import pytest
import torch

from deepnlme.nn.mlp import CovariateScaler
from deepnlme.nn.rhs import StateNetwork, UniversalRhs


def network(**kw) -> StateNetwork:
    args = {"n_state": 2, "n_covariates": 2, "n_eta": 1, "n_out": 3, "hidden": (5, 4),
            "state_center": [1.0, 0.0], "state_scale": [2.0, 4.0],
            "scaler": CovariateScaler([70.0, 50.0], [15.0, 20.0]), "zero_last": False}
    return StateNetwork(**{**args, **kw}).double()


def test_context_split_equals_the_plain_mlp_on_all_inputs():
    net = network(time_scale=24.0)
    g = torch.Generator().manual_seed(0)
    state = torch.randn(6, 2, generator=g, dtype=torch.float64)
    x = 70 + 10 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    eta = torch.randn(6, 1, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 48
    out = net(state, net.context(x, eta), t)
    inputs = torch.cat([
        (state - torch.tensor([1.0, 0.0])) / torch.tensor([2.0, 4.0]),
        (t / 24.0)[:, None],
        (x - torch.tensor([70.0, 50.0])) / torch.tensor([15.0, 20.0]),
        eta,
    ], -1)
    h = inputs
    for j, layer in enumerate(net.linears):
        h = layer(torch.tanh(h) if j else h)
    torch.testing.assert_close(out, h)
    assert out.shape == (6, 3)


def test_zero_output_layer_and_prior():
    net = network(zero_last=True, l2=2.0, l1=0.5)
    out = net(torch.ones(3, 2, dtype=torch.float64), net.context(torch.ones(3, 2) * 70,
                                                                    torch.zeros(3, 1)))
    assert torch.equal(out, torch.zeros(3, 3, dtype=torch.float64))
    weights = list(net.linears.parameters())
    expected = -0.5 * 2.0 * sum((w * w).sum() for w in weights) - 0.5 * sum(
        w.abs().sum() for w in weights
    )
    torch.testing.assert_close(net.log_prior(), expected)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="activation must be one of"):
        StateNetwork(1, activation="relu")
    with pytest.raises(ValueError, match="at least one state input"):
        StateNetwork(0)
    with pytest.raises(ValueError, match="takes the time t as an input"):
        net = StateNetwork(1, time_scale=1.0)
        net(torch.zeros(2, 1), net.context())


def test_universal_rhs_adds_the_network_to_the_mechanistic_part():
    def decay(t, amounts, indiv):
        return -indiv["k"][:, None] * amounts

    net = StateNetwork(2, n_out=2, zero_last=True).double()
    rhs = UniversalRhs(net, lambda a, indiv: a, mechanistic=decay)
    indiv = rhs.prepare({"k": torch.tensor([0.5, 2.0], dtype=torch.float64)})
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(rhs(t, a, indiv), decay(t, a, indiv))  # network off: mechanistic
    with torch.no_grad():
        net.linears[-1].bias.copy_(torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(rhs(t, a, indiv), decay(t, a, indiv) + torch.tensor([1.0, -1.0]))
    alone = UniversalRhs(net, lambda a, indiv: a)  # the whole right-hand side
    torch.testing.assert_close(alone(t, a, alone.prepare({})), torch.tensor([[1.0, -1.0]] * 2))
