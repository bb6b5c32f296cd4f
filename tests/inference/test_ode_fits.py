"""Estimators through numerically integrated dynamics: the ODE version of a closed-form
model has the closed form's Laplace optimum, and marginal-likelihood gradients through the
ODE equal finite differences (float64)."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.dynamics import OdeDynamics, OneCmtOral
from deepnlme.inference import Laplace
from deepnlme.inference.optimize import objective_and_gradient, trainable
from deepnlme.model.zoo.ode_pk import TwoCmtMMOralModel
from deepnlme.model.zoo.pk import OneCmtOralModel

# Laplace optimum of the closed-form model on Theophylline (experiments/theophylline_laplace)
OPTIMUM = {
    "tvka": 1.5789,
    "tvcl": 0.04004,
    "tvv": 0.4575,
    "omega": [0.6526**2, 0.2652**2, 0.1339**2],
    "sigma_add": 0.6912,
}


def test_ode_one_cmt_oral_has_the_closed_form_optimum():
    """At the closed form's optimum the ODE model's Laplace objective and its gradient equal
    the closed form's (the optimum: loglik −180.1533, gradient ~0, so the same stationary
    point)."""
    pop = load_dataset("theophylline")
    closed = OneCmtOralModel(error="additive", init=OPTIMUM)
    ode = OneCmtOralModel(error="additive", init=OPTIMUM)
    ode.dynamics = OdeDynamics.linear(OneCmtOral, rtol=1e-8, atol=1e-10)
    results = []
    for model in (closed, ode):
        est = Laplace(model)
        loss, loglik, gmax = objective_and_gradient(est, pop)
        grads = torch.cat([p.grad.flatten() for p in trainable(model)])
        results.append((loglik, gmax, grads))
    (ll_c, g_c, grad_c), (ll_o, g_o, grad_o) = results
    assert ll_c == pytest.approx(-180.1533, abs=2e-3)
    assert ll_o == pytest.approx(ll_c, abs=1e-5)
    assert g_c < 0.05 and g_o < 0.05
    torch.testing.assert_close(grad_o, grad_c, rtol=0, atol=1e-4)


def test_laplace_gradient_through_the_ode_equals_finite_differences():
    """Michaelis–Menten two-compartment model on three Theophylline subjects (fixed-step RK4:
    the discrete solution is smooth in every parameter); directional derivative of the
    Laplace objective along a random direction of the raw parameters."""
    pop = load_dataset("theophylline").subset([0, 5, 9])
    model = TwoCmtMMOralModel(solver={"method": "rk4", "max_step": 1.0})
    est = Laplace(model, inner={"gtol": 1e-10})
    params = trainable(model)
    torch.manual_seed(0)
    direction = [torch.randn_like(p) for p in params]
    loss = est.loss(pop)
    grads = torch.autograd.grad(loss, params)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    eps = 1e-5
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
        values.append(float(est.loss(pop).detach()))
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert float(analytic) == pytest.approx(numeric, rel=1e-5, abs=1e-6)
