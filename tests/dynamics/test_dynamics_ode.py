"""ODE path specifics: nonlinear steady state, nn.Module right-hand sides, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepnlme.dynamics import OdeDynamics, OneCmtOral


def michaelis_menten(t, amounts, indiv):
    """1-cmt IV with saturable elimination: dA/dt = -vmax·A / (km·v + A)."""
    a = amounts[:, 0]
    da = -indiv["vmax"] * a / (indiv["km"] * indiv["v"] + a)
    return da[:, None]


def mm_dynamics(**kw):
    return OdeDynamics(
        michaelis_menten, ("central",), required=("vmax", "km", "v"), rtol=1e-7, atol=1e-7, **kw
    )


def test_nonlinear_steady_state_equals_long_dose_train(make_pop, make_dose):
    """SS=1 bolus and SS infusion (with lag) equal the end of a long explicit dose train."""
    ii, n_doses = 6.0, 10
    obs = [0.0, 0.5, 2.0, 3.0, 5.9]
    start = ii * (n_doses - 1)
    subjects = [
        {"doses": [make_dose(0.0, 100.0, ss=1, ii=ii, epoch=1)], "obs": [(t, 1) for t in obs]},
        {
            "doses": [make_dose(0.0, 100.0, rate=40.0, ss=1, ii=ii, epoch=1)],
            "obs": [(t, 1) for t in obs],
        },
        {
            "doses": [make_dose(ii * i, 100.0) for i in range(n_doses)],
            "obs": [start + t for t in obs],
        },
        {
            "doses": [make_dose(ii * i, 100.0, rate=40.0) for i in range(n_doses)],
            "obs": [start + t for t in obs],
        },
    ]
    pop = make_pop(subjects)
    indiv = {
        "vmax": torch.full((4,), 30.0),
        "km": torch.full((4,), 2.0),
        "v": torch.full((4,), 10.0),
        "lag": torch.tensor([0.0, 1.0, 0.0, 1.0]),
    }
    out = mm_dynamics()(indiv, pop)[..., 0]
    torch.testing.assert_close(out[:2], out[2:], rtol=1e-5, atol=1e-5)
    assert out[0, 0] > 100.0  # the trough before the SS dose is not zero


class LearnedElimination(nn.Module):
    """Neural-ODE style rhs: first-order absorption, elimination cl/v · A · (1 + mlp(A))."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, t, amounts, indiv):
        depot, central = amounts[:, 0], amounts[:, 1]
        absorption = indiv["ka"] * depot
        factor = 1 + 0.1 * torch.tanh(self.mlp(central[:, None] / 100.0))[:, 0]
        elimination = indiv["cl"] / indiv["v"] * central * factor
        return torch.stack([-absorption, absorption - elimination], dim=-1)


def test_module_rhs_gradients_flow(make_pop, make_dose):
    torch.manual_seed(0)
    rhs = LearnedElimination().double()
    # fixed-step RK4: the discrete solution is smooth in the weights (finite differences below)
    dyn = OdeDynamics(
        rhs, ("depot", "central"), 1, 2, ("ka", "cl", "v"), method="rk4", options={"step_size": 0.1}
    )
    assert any(p is q for p in dyn.parameters() for q in rhs.parameters())
    pop = make_pop(
        [
            {"doses": [make_dose(0.0, 100.0), make_dose(12.0, 100.0)], "obs": [1.0, 6.0, 13.0]},
            {"doses": [make_dose(0.0, 50.0, ss=1, ii=12.0, epoch=1)], "obs": [(2.0, 1)]},
        ]
    )
    indiv = {
        k: torch.tensor(v).requires_grad_(True)
        for k, v in {"ka": [1.0, 0.8], "cl": [2.0, 3.0], "v": [20.0, 25.0]}.items()
    }
    out = dyn(indiv, pop)[..., 1]
    loss = (out * pop.obs_mask).sum()
    loss.backward()
    for p in rhs.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for v in indiv.values():
        assert torch.isfinite(v.grad).all()

    # directional derivative w.r.t. the network weights against finite differences
    w = rhs.mlp[0].weight
    direction = torch.randn_like(w)
    analytic = (w.grad * direction).sum()
    eps = 1e-4
    with torch.no_grad():
        w += eps * direction
        up = (dyn(indiv, pop)[..., 1] * pop.obs_mask).sum()
        w -= 2 * eps * direction
        down = (dyn(indiv, pop)[..., 1] * pop.obs_mask).sum()
        w += eps * direction
    torch.testing.assert_close(analytic, (up - down) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_float32_ode_matches_closed_form(make_pop, make_dose):
    pop = make_pop(
        [
            {"doses": [make_dose(0.0, 100.0), make_dose(8.0, 50.0, rate=25.0)], "obs": [1, 9, 20]},
            {"doses": [make_dose(0.0, 100.0, ss=1, ii=12.0, epoch=1)], "obs": [(1, 1), (6, 1)]},
        ]
    ).to(dtype=torch.float32)
    indiv = {
        "ka": torch.tensor([1.2, 0.7]),
        "cl": torch.tensor([2.0, 2.5]),
        "v": torch.tensor([20.0, 15.0]),
    }
    indiv = {k: v.float() for k, v in indiv.items()}
    ode = OdeDynamics.linear(OneCmtOral, rtol=1e-6, atol=1e-5)(indiv, pop)
    closed = OneCmtOral()(indiv, pop)
    assert ode.dtype == torch.float32
    torch.testing.assert_close(ode, closed, rtol=1e-4, atol=1e-3)


def test_ss_lag_longer_than_interval_rejected(make_pop, make_dose):
    pop = make_pop([{"doses": [make_dose(0.0, 100.0, ss=1, ii=2.0, epoch=1)], "obs": [(1, 1)]}])
    indiv = {k: torch.tensor([v]) for k, v in {"ka": 1.0, "cl": 2.0, "v": 20.0, "lag": 3.0}.items()}
    with pytest.raises(ValueError, match="lag time >= II"):
        OdeDynamics.linear(OneCmtOral)(indiv, pop)
