"""Solves differentiated once (``deepnlme.dynamics.linearized``): values built on a recorded
solve keep their value and their exact first derivatives for any later cotangent; a solve
that depends on a weight outside its per-row inputs is not recorded."""

from __future__ import annotations

import torch
from test_dynamics_solvers import MM_INDIV, mm_population

from deepnlme.dynamics import OdeDynamics
from deepnlme.dynamics.linearized import linearizing_solves
from deepnlme.model.zoo.ode_pk import two_cmt_mm_dynamics, two_cmt_mm_rhs


def _indiv(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row individual parameters ``(3,)`` that depend on the leaf ``theta`` ``(6,)``."""
    return {
        k: torch.tensor(v, dtype=torch.float64) * torch.exp(theta[j])
        for j, (k, v) in enumerate(MM_INDIV.items())
    }


def _values(amounts: torch.Tensor, pop) -> torch.Tensor:
    """A per-row value ``(N,)`` built on the central amounts: a sum of squared residuals."""
    central = amounts[..., 1]
    return (((central - 3.0 * pop.obs_time) ** 2) * pop.obs_mask).sum(-1)


def test_recorded_solve_gives_exact_first_derivatives(make_pop, make_dose):
    """Two different cotangents on the values (as the Laplace objective's two passes): the
    gradients for the parameters equal those through the solve itself (doses, an infusion,
    a reset), and the solve was recorded (its graph left the values' graph)."""
    pop = mm_population(make_pop, make_dose)
    dyn = two_cmt_mm_dynamics(rtol=1e-8, atol=1e-10)
    theta = torch.linspace(-0.1, 0.1, 6, dtype=torch.float64).requires_grad_(True)
    weights = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 4.0, -1.0])]
    plain = _values(dyn(_indiv(theta), pop), pop)
    expected = [
        torch.autograd.grad((plain * w).sum(), theta, retain_graph=True)[0] for w in weights
    ]
    with linearizing_solves() as lin:
        handed = dyn(_indiv(theta), pop)
        assert len(lin.solves) == 1 and not handed.grad_fn  # detached: recorded
        values = lin.attach(_values(handed, pop))
    assert not lin.solves
    torch.testing.assert_close(values, plain, rtol=0, atol=0)
    for w, exp in zip(weights, expected, strict=True):
        (got,) = torch.autograd.grad((values * w).sum(), theta, retain_graph=True)
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_solve_with_an_outside_weight_is_not_recorded(make_pop, make_dose):
    """An ``rhs`` function that uses a weight of its own (not an individual parameter): the
    solve keeps its graph, and the weight gets its gradient."""
    pop = mm_population(make_pop, make_dose)
    scale = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)

    def rhs(t, amounts, p):
        return scale * two_cmt_mm_rhs(t, amounts, p)

    dyn = OdeDynamics(rhs, ("depot", "central", "peripheral"), 1, 2, tuple(MM_INDIV))
    theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(_values(dyn(_indiv(theta), pop), pop).sum(), scale)
    with linearizing_solves() as lin:
        amounts = dyn(_indiv(theta), pop)
        assert not lin.solves and amounts.grad_fn is not None
        values = lin.attach(_values(amounts, pop))
    (got,) = torch.autograd.grad(values.sum(), scale)
    assert float(expected) != 0.0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
