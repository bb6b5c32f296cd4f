"""Estimators through numerically integrated dynamics: the ODE version of a closed-form
model has the closed form's Laplace optimum, and marginal-likelihood gradients through the
ODE equal finite differences (float64)."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.dynamics import OdeDynamics, OneCmtOral
from deepnlme.inference import FOCEI, Laplace
from deepnlme.inference.inner import InnerOptions, difference_hessian, value_derivatives
from deepnlme.inference.joint import NegLogJoint
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
    """Michaelis–Menten two-compartment model on four Theophylline subjects (fixed-step RK4:
    the discrete solution is smooth in every parameter); directional derivative of the
    Laplace objective along a random direction of the raw parameters."""
    pop = load_dataset("theophylline").subset([0, 3, 6, 9])
    model = TwoCmtMMOralModel(solver={"method": "rk4", "max_step": 0.5})
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


def test_difference_derivatives_equal_autograd():
    """η-Hessian and FOCEI Jacobians by differences equal reverse mode (closed-form model),
    and so do the parameter gradients of what is built from them."""
    pop = load_dataset("theophylline")
    model = OneCmtOralModel(error="combined", init=OPTIMUM)
    joint = NegLogJoint(model)
    eta = 0.3 * torch.randn(len(pop), 3, generator=torch.Generator().manual_seed(1))
    leaf = eta.clone().requires_grad_(True)
    nll, grad, hess = joint.exact_hessian(leaf, pop, create_graph=True)
    f_d, g_d, h_d = difference_hessian(joint, leaf, pop, None, 1e-5, create_graph=True)
    torch.testing.assert_close(f_d, nll, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_d, grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_d, hess, rtol=1e-7, atol=1e-7)
    params = trainable(model)
    exact = torch.autograd.grad(torch.logdet(hess).sum(), params)
    approx = torch.autograd.grad(torch.logdet(h_d).sum(), params)
    for a, e in zip(approx, exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)

    terms, d_mean, d_var = joint.gaussian_jacobians(leaf, pop)
    terms_d, d_mean_d, d_var_d = joint.gaussian_jacobians_by_differences(leaf, pop, None, 1e-5)
    torch.testing.assert_close(terms_d.nll, terms.nll, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_mean_d, d_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(d_var_d, d_var, rtol=1e-7, atol=1e-8)


def test_ode_focei_equals_closed_form_focei():
    """FOCEI through the ODE (expected information by differences) equals the closed form's
    (reverse mode): objective and gradient at the same parameters."""
    pop = load_dataset("theophylline")
    results = []
    for ode in (False, True):
        model = OneCmtOralModel(error="additive", init=OPTIMUM)
        if ode:
            model.dynamics = OdeDynamics.linear(OneCmtOral, rtol=1e-8, atol=1e-10)
        loss, loglik, _ = objective_and_gradient(FOCEI(model), pop)
        results.append((loglik, torch.cat([p.grad.flatten() for p in trainable(model)])))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-4)


def test_value_derivatives_equal_autograd():
    """l, ∇l and ∇²l from differences of values alone (one batch of 25 points per subject)
    equal reverse mode (closed-form model), and so do the parameter and η gradients of
    log det ∇²l built from them with one first-order reverse pass."""
    pop = load_dataset("theophylline")
    model = OneCmtOralModel(error="combined", init=OPTIMUM)
    joint = NegLogJoint(model)
    eta = 0.3 * torch.randn(len(pop), 3, generator=torch.Generator().manual_seed(2))
    leaf = eta.clone().requires_grad_(True)
    nll, grad, hess = joint.exact_hessian(leaf, pop, create_graph=True)
    leaf_v = eta.clone().requires_grad_(True)
    f_v, g_v, h_v = value_derivatives(joint, leaf_v, pop, None, InnerOptions(), graph=True)
    torch.testing.assert_close(f_v, nll, rtol=1e-13, atol=0)
    torch.testing.assert_close(g_v, grad, rtol=1e-8, atol=1e-8)
    scale = float(hess.detach().abs().max())
    torch.testing.assert_close(h_v, hess, rtol=0, atol=3e-8 * scale)  # ~1e-8 of the largest
    params = trainable(model)
    exact = torch.autograd.grad(torch.logdet(hess).sum(), [leaf, *params])
    approx = torch.autograd.grad(torch.logdet(h_v).sum(), [leaf_v, *params])
    for a, e in zip(approx, exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    _, g_only, none = value_derivatives(joint, eta, pop, None, InnerOptions(), hessian=False)
    assert none is None
    torch.testing.assert_close(g_only, grad.detach(), rtol=1e-8, atol=1e-8)


def test_ode_fit_stops_at_the_gradients_precision_at_the_closed_form_optimum():
    """Adaptive steps leave the gradient a noise of up to ~1.5e-4 at rtol 1e-6: L-BFGS stops
    below 3e-4 (``stopping_gtol``: 300·rtol; fixed steps and closed forms keep ``gtol``),
    converged, at the closed form's Laplace optimum (loglik and estimates)."""
    from deepnlme.inference.optimize import fit, stopping_gtol

    pop = load_dataset("theophylline")
    closed = OneCmtOralModel(error="additive")
    ode = OneCmtOralModel(error="additive")
    ode.dynamics = OdeDynamics.linear(OneCmtOral, rtol=1e-6, atol=1e-8)
    fixed = TwoCmtMMOralModel(solver={"method": "rk4", "max_step": 0.5})
    assert stopping_gtol(Laplace(ode), 1e-6) == pytest.approx(3e-4)
    assert stopping_gtol(Laplace(closed), 1e-6) == 1e-6
    assert stopping_gtol(Laplace(fixed), 1e-6) == 1e-6
    results = {name: fit(Laplace(m), pop) for name, m in (("closed", closed), ("ode", ode))}
    assert results["ode"].converged and results["ode"].grad_max < 3e-4
    # the solution differs from the closed form by ~rtol: the objective by 6e-5
    assert results["ode"].loss == pytest.approx(results["closed"].loss, abs=1e-4)
    for name, value in closed.param_values().items():
        torch.testing.assert_close(ode.param_values()[name], value, rtol=2e-3, atol=1e-6)
