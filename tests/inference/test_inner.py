"""Inner mode-finding pieces: positive-definite Hessian repair and log-determinants."""

import pytest
import torch

from deepnlme.inference.inner import InnerOptions, absolute_eigenvalues, chord_steps, find_modes
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.laplace import _logdet


def test_absolute_eigenvalues_keeps_pd_and_flips_negative():
    pd = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    out = absolute_eigenvalues(torch.stack([pd, indefinite]))
    assert torch.allclose(out[0], pd)
    assert torch.allclose(out[1], torch.diag(torch.tensor([1.0, 3.0])))


def test_absolute_eigenvalues_survives_non_finite_and_extreme_entries():
    bad = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    huge = torch.tensor([[1e300, 1e300], [1e300, -1e300]])
    out = absolute_eigenvalues(torch.stack([bad, huge]))
    assert torch.equal(out[0], torch.eye(2))
    assert torch.isfinite(out[1]).all()
    assert (torch.linalg.eigvalsh(out[1]) > 0).all()


def test_logdet_is_log_abs_det_where_not_positive_definite():
    pd = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    got = _logdet(torch.stack([pd, indefinite]))
    assert torch.allclose(
        got, torch.tensor([torch.logdet(pd).item(), torch.log(torch.tensor(3.0)).item()])
    )


def _theophylline_joint():
    from deepnlme.data import load_dataset
    from deepnlme.inference.joint import NegLogJoint
    from deepnlme.model.zoo.pk import OneCmtOralModel

    pop = load_dataset("theophylline")
    init = {"tvka": 1.5, "tvcl": 0.04, "tvv": 0.45, "omega": [0.4, 0.07, 0.02]}
    model = OneCmtOralModel(init=init)
    return pop, model, NegLogJoint(model)


@pytest.mark.parametrize("curvature_scale", [1.0, 30.0, 0.02])
def test_chord_start_reaches_the_cold_start_modes(curvature_scale):
    """Modes and Hessians of one θ, then θ moved: from them (even with a badly scaled stored
    curvature) the search ends at the modes found from η = 0, with no worse gradient."""
    pop, model, joint = _theophylline_joint()
    opts = InnerOptions(gtol=1e-8)
    first = find_modes(joint, torch.zeros(len(pop), 3), pop, options=opts)
    with torch.no_grad():
        model.tvka.raw += 0.1
        model.tvv.raw -= 0.05
    warm = find_modes(joint, first.eta, pop, options=opts, hessian0=curvature_scale * first.hessian)
    cold = find_modes(joint, torch.zeros(len(pop), 3), pop, options=opts)
    assert bool(warm.converged.all()) and bool(cold.converged.all())
    torch.testing.assert_close(warm.eta, cold.eta, rtol=0, atol=1e-7)
    if curvature_scale == 1.0:  # the right curvature: chord steps alone got there
        assert warm.n_iter == 0 < cold.n_iter


def test_chord_steps_stop_subjects_that_do_not_improve():
    """A stored curvature pointing the wrong way leaves the work to Newton: η unchanged."""
    pop, model, joint = _theophylline_joint()
    first = find_modes(joint, torch.zeros(len(pop), 3), pop, options=InnerOptions(gtol=1e-8))
    with torch.no_grad():
        model.tvcl.raw += 0.2
    eta, done, predicted, before, final = chord_steps(
        joint, first.eta, 1e-6 * first.hessian, pop, None, InnerOptions()
    )
    assert final is None
    assert not bool(done.any()) and not bool(predicted.any())
    assert bool(before.isnan().all())  # no Newton step taken
    torch.testing.assert_close(eta, first.eta, rtol=0, atol=0)


def test_step_limit_keeps_direction_and_longest_component():
    from deepnlme.inference.inner import _limit

    step = torch.tensor([[0.3, -4.0, 1.0], [0.1, 0.1, 0.1]])
    scale = torch.tensor([1.0, 0.5, 2.0])
    out = _limit(step, scale, 2.0)
    assert torch.equal(out[1], step[1])  # within the radius: unchanged
    torch.testing.assert_close(out[0], step[0] / 4.0)  # |-4| / 0.5 = 8 SDs -> 2 SDs
    assert torch.equal(_limit(step, scale, None), step)


def test_modes_many_prior_sds_away_are_still_found():
    """With a tight Ω the modes lie several prior SDs out: the limited search (more, shorter
    steps) ends where the unlimited one does."""
    pop, model, joint = _theophylline_joint()
    model.omega.set_value([0.01, 0.01, 0.01])
    limited = find_modes(joint, torch.zeros(len(pop), 3), pop, options=InnerOptions(gtol=1e-9))
    free = find_modes(
        joint, torch.zeros(len(pop), 3), pop, options=InnerOptions(gtol=1e-9, max_step=None)
    )
    assert bool(limited.converged.all())
    assert float((limited.eta.abs() / 0.1).max()) > 3.0  # some subject beyond 3 SDs
    torch.testing.assert_close(limited.eta, free.eta, rtol=0, atol=1e-8)


def test_infeasible_parameters_give_a_finite_barrier_and_keep_the_modes():
    """Where the objective is not finite (exp overflow at a far line-search trial), the loss is
    INFEASIBLE_LOSS with zero gradient and the stored warm starts stay those of the last
    finite evaluation."""
    from deepnlme.data import load_dataset
    from deepnlme.inference import Laplace
    from deepnlme.inference.laplace import INFEASIBLE_LOSS
    from deepnlme.model.zoo.pk import OneCmtOralModel

    pop = load_dataset("theophylline")
    model = OneCmtOralModel()
    estimator = Laplace(model)
    finite = estimator.loss(pop)
    modes = estimator.modes(pop)
    with torch.no_grad():
        model.tvcl.raw.fill_(800.0)
    assert not torch.isfinite(estimator.joint(modes, pop).nll).all()  # the model overflows
    loss = estimator.loss(pop)
    loss.backward()
    assert float(loss.detach()) == INFEASIBLE_LOSS > float(finite.detach())
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())
    torch.testing.assert_close(estimator._eta_hat, modes, rtol=0, atol=0)


def test_warm_start_in_the_flip_flop_mode_is_searched_again_from_zero():
    """Oral absorption has a second local minimum per subject, ka and ke swapped (V scaled by
    ke/ka, CL unchanged): the same curve, a worse prior. A warm start left there (far out in
    η) must not keep a subject in it."""
    pop, model, joint = _theophylline_joint()
    model.sigma_add.set_value(0.05)  # sharp data: a deep barrier between the two minima
    opts = InnerOptions(gtol=1e-8)
    cold = find_modes(joint, torch.zeros(len(pop), 3), pop, options=opts)
    p = model.param_values()
    indiv = model.individual_parameters(cold.eta, pop)
    ke = indiv["cl"] / indiv["v"]
    flipped = torch.stack(
        [
            torch.log(ke / p["tvka"]),
            cold.eta[:, 1],
            torch.log(indiv["v"] * ke / indiv["ka"] / p["tvv"]),
        ],
        -1,
    ).detach()
    stay = find_modes(joint, flipped, pop, options=InnerOptions(gtol=1e-8, restart_sd=None))
    assert bool((stay.nll > cold.nll + 1.0).any())  # some subjects sit in the flip-flop mode
    back = find_modes(joint, flipped, pop, options=opts)
    torch.testing.assert_close(back.eta, cold.eta, rtol=0, atol=1e-6)


def _ode_theophylline_modes():
    """Theophylline with ``OdeDynamics.linear(OneCmtOral)`` (η-derivatives from differences
    of values): ``(pop, model, joint, options, modes from η = 0)``."""
    from deepnlme.dynamics import OdeDynamics, OneCmtOral

    pop, model, joint = _theophylline_joint()
    model.dynamics = OdeDynamics.linear(OneCmtOral, rtol=1e-6, atol=1e-8)
    opts = InnerOptions()
    return pop, model, joint, opts, find_modes(joint, torch.zeros(len(pop), 3), pop, options=opts)


@pytest.mark.parametrize("margin", [100.0, 1e-30])
def test_predicted_newton_steps_are_checked(monkeypatch, margin):
    """ODE dynamics (Hessians from differences of values): Newton steps predicted to converge
    are taken without an evaluation of their own; the evaluation at the modes checks them.
    Predicting every step (a vanishing margin), the misses are caught and searched on: the
    warm search still ends at the cold search's modes."""
    from deepnlme.inference import inner

    pop, model, joint, opts, first = _ode_theophylline_modes()
    with torch.no_grad():
        model.tvka.raw += 0.1
        model.tvv.raw -= 0.05
    cold = find_modes(joint, torch.zeros(len(pop), 3), pop, options=opts)
    monkeypatch.setattr(inner, "PREDICTION_MARGIN", margin)
    warm = find_modes(joint, first.eta, pop, options=opts, hessian0=first.hessian)
    assert bool(warm.converged.all()) and bool(cold.converged.all())
    assert float(warm.grad.abs().max()) < opts.gtol
    torch.testing.assert_close(warm.eta, cold.eta, rtol=0, atol=1e-5)


def test_remembered_convergence_constants_save_an_evaluation(monkeypatch):
    """ODE dynamics: a warm search measures each subject's convergence constant; handed to
    the next search (``rate0``), it lets the first Newton step be taken unchecked where it is
    predicted to converge. That search evaluates less and still ends at the modes (gradient
    below gtol, the cold search's modes)."""
    from deepnlme.inference.joint import NegLogJoint

    pop, model, joint, opts, first = _ode_theophylline_modes()
    with torch.no_grad():
        model.tvka.raw += 0.02
    second = find_modes(joint, first.eta, pop, options=opts, hessian0=first.hessian)
    assert second.rate is not None and bool(torch.isfinite(second.rate).any())
    with torch.no_grad():
        model.tvv.raw += 2e-6  # the modes move by ~1e-3: the late steps of a fit
    calls = []
    original = NegLogJoint.__call__
    monkeypatch.setattr(
        NegLogJoint, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    runs = {}
    for name, rate0 in (("without", None), ("with", second.rate)):
        calls.clear()
        runs[name] = find_modes(
            joint, second.eta, pop, options=opts, hessian0=second.hessian, rate0=rate0
        )
        runs[name + " calls"] = len(calls)
    monkeypatch.undo()
    cold = find_modes(joint, torch.zeros(len(pop), 3), pop, options=opts)
    assert runs["with calls"] < runs["without calls"]
    for name in ("without", "with"):
        assert float(runs[name].grad.abs().max()) < opts.gtol
        torch.testing.assert_close(runs[name].eta, cold.eta, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("margin", "change"), [(10.0, 1e-4), (1e30, 1e-2)])
def test_a_step_predicted_to_end_the_search_is_the_evaluation_at_the_modes(
    monkeypatch, margin, change
):
    """ODE dynamics: a Newton step predicted to end the search near convergence is evaluated
    as the evaluation at the modes (its solves' reverse pass waiting until it is the one):
    one solve fewer, and the same modes, values, derivatives and gradients as a search that
    evaluates the step first. Evaluating every step so (a huge margin), the misses serve the
    search as its own evaluations did, each search still takes one reverse pass through its
    solves, and the results are the same."""
    from deepnlme.dynamics.linearized import SolveLinearization
    from deepnlme.inference import inner
    from deepnlme.inference.joint import NegLogJoint

    pop, model, joint, opts, first = _ode_theophylline_modes()
    with torch.no_grad():
        model.tvka.raw += 0.02
    second = find_modes(joint, first.eta, pop, options=opts, hessian0=first.hessian)
    with torch.no_grad():
        model.tvv.raw += change  # 1e-4: a step predicted to end within 10·gtol; 1e-2: misses
    calls, passes = [], []
    original, attach = NegLogJoint.__call__, SolveLinearization.attach
    monkeypatch.setattr(
        NegLogJoint, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    monkeypatch.setattr(
        SolveLinearization, "attach", lambda self, v: passes.append(1) or attach(self, v)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for name, finish_margin in (("evaluated", 0.0), ("finished", margin)):
        monkeypatch.setattr(inner, "FINISH_MARGIN", finish_margin)
        calls.clear()
        passes.clear()
        with inner.reusing_steps(joint):  # one step sequence for all solves (as a fit has)
            run = find_modes(
                joint, second.eta, pop, options=opts, hessian0=second.hessian,
                rate0=second.rate, keep_graph=True,
            )
        total = run.nll.sum() + run.grad.sum() + run.hessian.sum()
        runs[name] = (run, torch.autograd.grad(total, params), len(calls), len(passes))
    (plain, plain_grads, plain_calls, _), (fast, fast_grads, fast_calls, fast_passes) = (
        runs["evaluated"], runs["finished"]
    )
    if margin == 10.0:
        assert fast_calls == plain_calls - 1
    assert fast_passes == 1
    assert bool(fast.converged.all()) and float(fast.grad.detach().abs().max()) < opts.gtol
    torch.testing.assert_close(fast.eta, plain.eta, rtol=0, atol=1e-9)
    for got, want in zip(
        (fast.nll, fast.grad, fast.hessian, *fast_grads),
        (plain.nll, plain.grad, plain.hessian, *plain_grads),
        strict=True,
    ):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-9, atol=1e-9)


def test_kept_newton_derivatives_join_the_fresh_ones(monkeypatch):
    """Damped Newton with derivatives from differences of values: derivatives kept from the
    evaluation of a step serve the subjects that took it; the others are evaluated, in one
    batch, and the whole equals an evaluation of every subject; nothing is kept after."""
    from deepnlme.inference.inner import _KnownDerivatives, value_derivatives
    from deepnlme.inference.joint import NegLogJoint

    pop, model, joint, opts, first = _ode_theophylline_modes()
    eta = first.eta + 0.01
    every = value_derivatives(joint, eta, pop, None, opts)
    known = _KnownDerivatives(eta)
    kept = torch.tensor([0, 3, 4, 9])
    known.keep(kept, *(part[kept] for part in every))
    calls = []
    original = NegLogJoint.__call__
    monkeypatch.setattr(
        NegLogJoint, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    active = torch.arange(1, len(pop))  # subject 0 no longer active
    got = known.take(active, pop, None, joint, eta, opts)
    assert len(calls) == 1 and not bool(known.valid.any())
    for part, expected in zip(got, every, strict=True):
        torch.testing.assert_close(part, expected[active], rtol=0, atol=1e-9)


def test_values_predicted_from_the_solves_first_derivatives():
    """An evaluation at the modes with its graph records its solves with their first
    derivatives (:class:`ModesTangent`); from them l, ∇l and ∇²l at the same η are predicted
    for other parameters without a solve: exact at the recorded parameters, with an error of
    second order in the change of parameters (a fixed-step solve: smooth in them). Another η
    is not predicted."""
    from deepnlme.inference.inner import value_derivatives
    from deepnlme.model.zoo.ode_pk import TwoCmtMMOralModel

    pop, _, _ = _theophylline_joint()
    pop = pop.subset([0, 3, 6, 9])
    model = TwoCmtMMOralModel(solver={"method": "rk4", "max_step": 0.5})
    joint = NegLogJoint(model)
    opts = InnerOptions(gtol=1e-6)
    eta = find_modes(joint, torch.zeros(len(pop), 3), pop, options=opts).eta
    record = []
    with torch.enable_grad():
        recorded = value_derivatives(joint, eta, pop, None, opts, graph=True, record=record)
    (tangent,) = record
    with torch.no_grad():
        same = value_derivatives(joint, eta, pop, None, opts, tangent=tangent)
    assert tangent.used
    for got, want in zip(same, recorded, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-10)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    direction = [torch.randn_like(p) for p in params]
    errors = []
    for size in (2e-3, 4e-3):
        with torch.no_grad():
            for p, p0, d in zip(params, start, direction, strict=True):
                p.copy_(p0 + size * d)
            true = value_derivatives(joint, eta, pop, None, opts)
            predicted = value_derivatives(joint, eta, pop, None, opts, tangent=tangent)
        assert tangent.used
        change = (true[1] - recorded[1].detach()).abs().max()
        errors.append(float((predicted[1] - true[1]).abs().max()))
        assert errors[-1] < 0.05 * float(change)  # the gradient's change, predicted
    assert 3.0 < errors[1] / errors[0] < 5.0  # second order
    with torch.no_grad():
        value_derivatives(joint, eta + 0.01, pop, None, opts, tangent=tangent)
    assert not tangent.used
