"""The batched ODE solvers: every solver against closed forms and a reference solution,
order of convergence, the pseudo-time batch against subjects one by one, adjoint gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from test_dynamics_closed_vs_ode import scenario_batch

from deepnlme.dynamics import OdeDynamics, OneCmtOral, TwoCmtOral
from deepnlme.model.zoo.ode_pk import MM_REQUIRED, two_cmt_mm_dynamics, two_cmt_mm_rhs

NAMES = ["multiple", "infusion", "lag_bioav", "addl", "ss_bolus", "reset", "modelled_rate"]


@pytest.mark.parametrize(
    "solver",
    [
        dict(method="dopri5", rtol=1e-7, atol=1e-7),
        dict(method="rk4", max_step=0.05),
        dict(method="dopri5", rtol=1e-7, atol=1e-7, adjoint=True),
    ],
    ids=["dopri5", "rk4", "adjoint"],
)
def test_every_solver_matches_the_closed_form(make_pop, solver):
    model = TwoCmtOral()
    names = [n for n in NAMES if not (solver.get("adjoint") and n.startswith("ss"))]
    pop, indiv = scenario_batch(model, make_pop, names)
    closed = model(indiv, pop)
    ode = OdeDynamics.linear(TwoCmtOral, **solver)(indiv, pop)
    torch.testing.assert_close(ode, closed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_order_of_convergence(make_pop, method, order):
    """Halving every step divides the error by 2^order (one-compartment oral, two doses)."""
    model = OneCmtOral()
    pop, indiv = scenario_batch(model, make_pop, ["multiple", "smooth_lag_bioav"])
    closed = model(indiv, pop)
    errors = []
    for n in (32, 64):
        ode = OdeDynamics.linear(OneCmtOral, method=method, min_steps=n)(indiv, pop)
        errors.append(float((ode - closed).abs().max()))
    assert errors[0] / errors[1] == pytest.approx(2.0**order, rel=0.2)


def mm_population(make_pop, make_dose):
    """Three subjects on different event grids: oral doses, an IV infusion, a reset."""
    return make_pop(
        [
            {"doses": [make_dose(0.0, 320.0), make_dose(12.0, 160.0)], "obs": [0.5, 2, 6, 13, 24]},
            {"doses": [make_dose(1.0, 250.0, rate=100.0, cmt=2)], "obs": [0.5, 2, 3.5, 8]},
            {
                "doses": [make_dose(0.0, 400.0), make_dose(3.0, 200.0, epoch=1)],
                "obs": [1.0, (4.0, 1), (10.0, 1)],
            },
        ]
    )


MM_INDIV = {
    "ka": [1.3, 0.9, 2.2],
    "vmax": [40.0, 55.0, 30.0],
    "km": [4.0, 6.0, 3.0],
    "v": [30.0, 25.0, 40.0],
    "q": [5.0, 3.0, 8.0],
    "vp": [60.0, 40.0, 80.0],
}


def scipy_reference(pop, indiv) -> np.ndarray:
    """Central amounts ``(N, T)`` by scipy's DOP853 (rtol 1e-12), one subject, observation and
    segment between events at a time."""
    out = np.zeros(pop.obs_time.shape)
    for i in range(len(pop)):
        p = {k: torch.tensor([float(v[i])], dtype=torch.float64) for k, v in indiv.items()}

        def f(t, y, rate, p=p):
            x = torch.tensor(y, dtype=torch.float64)[None]
            return two_cmt_mm_rhs(torch.tensor([t]), x, p)[0].numpy() + rate

        doses = [
            (float(pop.dose_time[i, j]), int(pop.dose_epoch[i, j]), j)
            for j in range(pop.dose_time.shape[1])
            if pop.dose_mask[i, j]
        ]
        for slot in range(pop.obs_time.shape[1]):
            if not pop.obs_mask[i, slot]:
                continue
            t_obs, epoch = float(pop.obs_time[i, slot]), int(pop.obs_epoch[i, slot])
            mine = [d for d in doses if d[1] == epoch and d[0] <= t_obs]
            ends = {t0 + float(pop.dose_duration[i, j]) for t0, _, j in mine}
            events = sorted({d[0] for d in mine} | {t_obs} | {e for e in ends if e < t_obs})
            y, t = np.zeros(3), events[0]
            for nxt in [*events[1:], None]:
                for t0, _, j in mine:  # boluses at t
                    if t0 == t and pop.dose_rate[i, j] == 0:
                        y[int(pop.dose_cmt[i, j]) - 1 if pop.dose_cmt[i, j] > 0 else 0] += float(
                            pop.dose_amt[i, j]
                        )
                if nxt is None:
                    break
                rate = np.zeros(3)
                for t0, _, j in mine:
                    r = float(pop.dose_rate[i, j])
                    if r > 0 and t0 <= t and t0 + float(pop.dose_duration[i, j]) >= nxt:
                        rate[int(pop.dose_cmt[i, j]) - 1] += r
                tol = dict(rtol=1e-12, atol=1e-12)
                sol = solve_ivp(f, (t, nxt), y, method="DOP853", args=(rate,), **tol)
                y, t = sol.y[:, -1], nxt
            out[i, slot] = y[1]
    return out


_REFERENCE: list[np.ndarray] = []


def mm_reference(make_pop, make_dose) -> np.ndarray:
    """:func:`scipy_reference` of :func:`mm_population` (computed once)."""
    if not _REFERENCE:
        pop = mm_population(make_pop, make_dose)
        indiv = {k: torch.tensor(v, dtype=torch.float64) for k, v in MM_INDIV.items()}
        _REFERENCE.append(scipy_reference(pop, indiv))
    return _REFERENCE[0]


@pytest.mark.parametrize(
    "solver",
    [dict(method="dopri5", rtol=1e-8, atol=1e-8), dict(method="rk4", max_step=0.02)],
    ids=["dopri5", "rk4"],
)
def test_michaelis_menten_two_compartments_against_scipy(make_pop, make_dose, solver):
    pop = mm_population(make_pop, make_dose)
    indiv = {k: torch.tensor(v, dtype=torch.float64) for k, v in MM_INDIV.items()}
    ours = two_cmt_mm_dynamics(**solver)(indiv, pop)[..., 1]
    ref = torch.from_numpy(mm_reference(make_pop, make_dose))
    assert set(two_cmt_mm_dynamics().required) == set(MM_REQUIRED)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_batch_equals_subjects_one_by_one(make_pop, make_dose, method):
    """Each subject on its own grid inside the batch: the same as integrating it alone (the
    fixed-step solver with a step count per segment, as max_step depends on the batch)."""
    pop = mm_population(make_pop, make_dose)
    indiv = {k: torch.tensor(v, dtype=torch.float64) for k, v in MM_INDIV.items()}
    dyn = two_cmt_mm_dynamics(method=method, rtol=1e-9, atol=1e-9, min_steps=50)
    batch = dyn(indiv, pop)
    for i in range(len(pop)):
        sub = pop.subset([i])
        one = dyn({k: v[i : i + 1] for k, v in indiv.items()}, sub)
        n_obs = sub.obs_time.shape[1]
        torch.testing.assert_close(batch[i : i + 1, :n_obs], one, rtol=1e-7, atol=1e-7)


def test_adjoint_gradients_equal_direct_gradients(make_pop, make_dose):
    pop = mm_population(make_pop, make_dose)
    base = {k: torch.tensor(v, dtype=torch.float64) for k, v in MM_INDIV.items()}

    def grads(**solver):
        indiv = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        out = two_cmt_mm_dynamics(rtol=1e-7, atol=1e-7, **solver)(indiv, pop)[..., 1]
        return torch.autograd.grad((out * pop.obs_mask).sum(), list(indiv.values()))

    for a, d in zip(grads(adjoint=True), grads(), strict=True):
        torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-6)


def test_copies_of_a_subject_take_its_own_steps(make_pop, make_dose):
    """Copies of a subject in one batch (the same subject index, e.g. the points of a
    difference quotient in η) take the steps of the first copy: its states equal those of
    the subject integrated alone, and differences between the copies are smooth (they equal
    the derivative by autograd)."""
    pop = mm_population(make_pop, make_dose)
    base = {k: torch.tensor(v, dtype=torch.float64) for k, v in MM_INDIV.items()}
    dyn = two_cmt_mm_dynamics(rtol=1e-6, atol=1e-8)
    alone = dyn(base, pop)
    step = 1e-5
    copies = pop.subset(torch.arange(len(pop)).repeat(3))
    shift = torch.tensor([0.0, step, -step], dtype=torch.float64).repeat_interleave(len(pop))
    indiv = {k: v.repeat(3) for k, v in base.items()}
    indiv["ka"] = indiv["ka"] * torch.exp(shift)
    out = dyn(indiv, copies).reshape(3, len(pop), *alone.shape[1:])
    torch.testing.assert_close(out[0], alone, rtol=1e-14, atol=1e-14)
    log_ka = torch.log(base["ka"]).requires_grad_(True)
    central = dyn({**base, "ka": torch.exp(log_ka)}, pop)[..., 1]
    (exact,) = torch.autograd.grad((central * pop.obs_mask).sum(), log_ka)
    quotient = ((out[1] - out[2])[..., 1] * pop.obs_mask).sum(-1) / (2 * step)
    torch.testing.assert_close(quotient, exact, rtol=1e-6, atol=1e-8)


def test_adjoint_runaway_is_one_clear_error(make_pop, make_dose):
    """The adjoint recovers the state backwards in time: fast absorption over a long interval
    (depot ∝ e^(-ka·t), ka·t = 192) is unstable in reverse and its step size underflows —
    reported as one clear error; slow absorption on the same grid is fine."""
    pop = make_pop([{"doses": [make_dose(0.0, 300.0)], "obs": [24.0]}])
    dyn = two_cmt_mm_dynamics(adjoint=True, rtol=1e-6, atol=1e-8)
    for ka, fails in ((1.0, False), (8.0, True)):
        values = {"ka": ka, "vmax": 40.0, "km": 4.0, "v": 30.0, "q": 5.0, "vp": 60.0}
        indiv = {
            k: torch.tensor([v], dtype=torch.float64, requires_grad=True) for k, v in values.items()
        }
        out = dyn(indiv, pop)[..., 1].sum()
        if fails:
            with pytest.raises(RuntimeError, match=r"adjoint=True\): the state, integrated back"):
                torch.autograd.grad(out, list(indiv.values()))
        else:
            grads = torch.autograd.grad(out, list(indiv.values()))
            assert all(torch.isfinite(g).all() for g in grads)


def test_adjoint_gradients_of_a_module_rhs(make_pop, make_dose):
    """``adjoint=True`` routes gradients to the weights of an ``nn.Module`` right-hand side."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()

    class Rhs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, amounts, p):
            depot, central = amounts.unbind(-1)
            k = torch.nn.functional.softplus(self.net(central[:, None] / p["v"][:, None]))[:, 0]
            return torch.stack([-p["ka"] * depot, p["ka"] * depot - k * central], -1)

    pop = make_pop([{"doses": [make_dose(0.0, 100.0)], "obs": [1.0, 4.0, 8.0]}])
    indiv = {
        "ka": torch.tensor([1.2], dtype=torch.float64),
        "v": torch.tensor([20.0], dtype=torch.float64),
    }

    def grads(adjoint):
        dyn = OdeDynamics(
            Rhs(), ("depot", "central"), 1, 2, ("ka", "v"), rtol=1e-8, atol=1e-8, adjoint=adjoint
        )
        out = (dyn(indiv, pop)[..., 1] * pop.obs_mask).sum()
        return torch.autograd.grad(out, list(net.parameters()))

    for a, d in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-7)


def test_reused_steps(make_pop, make_dose):
    """``reusing_steps``: a solve of the subjects solved before, at parameters within 2%, takes
    the steps chosen then: at the same parameters the same states (to rounding), nearby states as
    accurate as the adaptive solve's (against scipy, over doses, an infusion and a reset),
    with a graph as without; parameters further off choose their own steps. A memory passed
    to a later block carries the steps over; a nested block shares its outer block's."""
    pop = mm_population(make_pop, make_dose)
    base = {k: torch.tensor(v, dtype=torch.float64) for k, v in MM_INDIV.items()}
    near = {**base, "ka": base["ka"] * 1.01, "vmax": base["vmax"] * 0.99}
    far = {**base, "ka": base["ka"] * 1.5}
    dyn = two_cmt_mm_dynamics(rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        own = {name: dyn(p, pop) for name, p in (("base", base), ("near", near), ("far", far))}
        with dyn.reusing_steps():
            first = dyn(base, pop)
            again = dyn(base, pop)
            reused = dyn(near, pop)
            chosen = dyn(far, pop)
    with dyn.reusing_steps() as memory, torch.enable_grad():
        dyn(base, pop)
        graph = dyn(near, pop)
    with torch.no_grad(), dyn.reusing_steps(memory), dyn.reusing_steps() as inner:
        carried = dyn(near, pop)
    assert inner is memory
    # replayed steps: the same states to rounding (the dense output is summed in another order)
    assert torch.equal(first, own["base"])
    torch.testing.assert_close(again, own["base"], rtol=1e-13, atol=0.0)
    assert torch.equal(chosen, own["far"])
    assert torch.equal(graph.detach(), reused) and torch.equal(carried, reused)
    assert not torch.equal(reused, own["near"])  # the steps of `base`, not its own
    ref = torch.from_numpy(scipy_reference(pop, near))
    error_reused, error_own = ((s[..., 1] - ref).abs().max() for s in (reused, own["near"]))
    assert error_own < 1e-4 * ref.abs().max() and error_reused < 2.0 * error_own
    assert getattr(dyn, "_step_memory", None) is None  # forgotten after the block


@pytest.mark.parametrize("window", [1, 7])
def test_dense_output_in_windows_of_steps(make_pop, make_dose, monkeypatch, window):
    """The observations read from the steps kept a window at a time equal those read from
    all steps at once, values and gradients (doses, an infusion, a reset)."""
    from deepnlme.dynamics import _solvers

    pop = mm_population(make_pop, make_dose)
    dyn = two_cmt_mm_dynamics(rtol=1e-6, atol=1e-8)

    def solve():
        indiv = {k: torch.tensor(v, requires_grad=True) for k, v in MM_INDIV.items()}
        out = dyn(indiv, pop)
        return out, torch.autograd.grad(out[..., 1].sum(), list(indiv.values()))

    monkeypatch.setattr(_solvers, "DENSE_WINDOW", 10_000)
    whole, grads = solve()
    monkeypatch.setattr(_solvers, "DENSE_WINDOW", window)
    monkeypatch.setattr(_solvers, "DENSE_BUDGET", 0)
    windowed, grads_windowed = solve()
    assert torch.equal(windowed, whole)
    for a, b in zip(grads_windowed, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
