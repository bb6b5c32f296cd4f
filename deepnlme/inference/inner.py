"""Batched mode-finding for the random effects: η̂_i = argmin_η l_i(η), all subjects at once.

Damped Newton (Levenberg–Marquardt) with per-subject damping: each iteration solves
``(|H| + λ·diag|H|) δ = -∇l`` where ``|H|`` is the exact Hessian with its eigenvalues
replaced by their absolute values (so steps always descend, also away from saddles and
maxima); a step is kept for a subject only if it lowers that subject's l, else its λ grows.
Near the mode this is Newton's method (quadratic convergence). No step is longer than
``max_step`` prior SDs of any η (a trust radius: keeps a search from leaping across a barrier
into another local minimum). Subjects that have converged drop out: later iterations
evaluate only the subjects still moving.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.dynamics.linearized import SolveTangent, linearizing_solves, predicting_solves
from deepnlme.inference.joint import NegLogJoint


@dataclass
class InnerOptions:
    """Settings of the inner (η) optimization."""

    max_iter: int = 100
    chord_iter: int = 12  # at most this many steps with a previous Hessian (see find_modes)
    gtol: float = 1e-4  # converged when max_j |∂l_i/∂η_j| < gtol (the objective adds the
    # second-order correction to the exact mode, so errors are O(gtol²))
    lambda_first: float = 1e-3  # damping after the first rejected (undamped Newton) step
    lambda_max: float = 1e12
    max_step: float | None = 2.0  # longest step, in prior SDs of each η (None: no limit).
    # A trust radius: an unlimited step that happens to lower l can jump across a barrier
    # into another local minimum (e.g. the flip-flop mode ka ↔ ke of oral absorption).
    hessian: str = "auto"  # η-Hessians (search and objective): "autograd" (reverse mode),
    # "differences" (central differences of exact gradients, all 2K+1 points in one batched
    # evaluation, relative error ~1e-8 in float64: one gradient's cost instead of K reverse
    # passes through e.g. an ODE solve, and second- instead of third-order derivatives for
    # the objective's gradient) or "auto" (differences for dynamics that set
    # ``difference_hessians``, i.e. numerically integrated ones; autograd otherwise).
    difference_step: float = 1e-5  # step in η of the differences
    value_differences: int = 4096  # with difference Hessians, batches of at most this many
    # points (N·(2K²+2K+1)) take l, ∇l and ∇²l from differences of l alone (one evaluation,
    # no reverse pass: cheaper while the batch is small enough for per-operation overhead to
    # dominate); 0: never. See :func:`value_derivatives`.
    value_hessian_step: float = 2e-4  # step in η of the second differences of l (truncation
    # and rounding errors balance: ~1e-8 of the largest entry in float64)
    restart_sd: float | None = 4.0  # warm-started modes beyond this many prior SDs are
    # searched again from η = 0 and the lower l kept (None: never): a warm start left far out
    # by a wild trial point must not decide which local minimum a subject ends in.


@dataclass
class InnerResult:
    """Modes and one evaluation at them.

    ``nll``, ``grad`` and ``hessian`` belong to the modes ``eta``; with ``keep_graph`` they
    keep their graph to the model's parameters and to ``leaf`` (the η tensor they were
    evaluated at, equal to ``eta``), otherwise they are detached.
    """

    eta: Tensor  # (N, K) modes (detached)
    nll: Tensor  # (N,) l_i at eta
    grad: Tensor  # (N, K) ∂l/∂η at eta
    hessian: Tensor  # (N, K, K) exact Hessian of l at eta
    leaf: Tensor  # (N, K) η input of the evaluation above
    n_iter: int  # Newton iterations (Hessian evaluations) of the search
    converged: Tensor  # (N,) bool: gradient below gtol (or within 1000·gtol at the precision limit)
    # (terms, ∂mean/∂η, ∂variance/∂η) at the modes, as NegLogJoint.gaussian_jacobians, when
    # find_modes was asked for them and took them from its own evaluation (else None)
    gaussian: tuple | None = None
    # (N,) each subject's convergence constant c (gradient after a Newton step ≈ c·|g|²),
    # measured by the last step of the search where it could be (NaN elsewhere): find_modes'
    # rate0 of a later search from these modes
    rate: Tensor | None = None
    # the solves of the evaluation at the modes with their first derivatives, where recorded:
    # find_modes' tangent0 of a later search from these modes
    tangent: ModesTangent | None = None


@dataclass
class ModesTangent:
    """The solves of an evaluation at modes ``eta`` ``(N, K)`` of the subjects ``subjects``
    ``(N,)`` with their first derivatives (:class:`~deepnlme.dynamics.linearized.SolveTangent`,
    recorded where the objective's values are linearized in the solves): from them
    :func:`value_derivatives` predicts l, ∇l and ∇²l at the same η for other parameters
    without a solve. ``used`` tells whether the last such prediction took them."""

    eta: Tensor
    subjects: Tensor
    tangents: list[SolveTangent]
    used: bool = False


@dataclass
class ModesEvaluation:
    """The evaluation of :func:`find_modes` at η ``leaf`` ``(N, K)``: l ``(N,)``, ∂l/∂η
    ``(N, K)``, ∂²l/∂η² ``(N, K, K)`` (with the graphs asked for), the Gaussian Jacobians
    where asked for and provided (``gaussian``: a list, else None) and ``record``: the
    :class:`ModesTangent` of its solves where it has one."""

    leaf: Tensor
    nll: Tensor
    grad: Tensor
    hessian: Tensor
    gaussian: list | None
    record: list
    # where the graphs are still to be attached (the values above detached): the call that
    # attaches them, returning (l, ∂l/∂η, ∂²l/∂η²) with their graphs (:meth:`completed`)
    pending: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None

    def completed(self) -> ModesEvaluation:
        """This evaluation with its graphs (attached now where they were pending)."""
        if self.pending is not None:
            self.nll, self.grad, self.hessian = self.pending()
            self.pending = None
        return self

    def below(self, gtol: float) -> bool:
        """Whether every subject's max |∂l/∂η| is below ``gtol``."""
        return bool(_below(self.grad, gtol).all())


def _below(grad: Tensor, gtol: float) -> Tensor:
    """``(N,)``: max |∂l/∂η| of each subject (``grad`` ``(N, K)``) below ``gtol``."""
    return grad.detach().abs().amax(-1) < gtol


def absolute_eigenvalues(hess: Tensor) -> Tensor:
    """|H|: each symmetric ``(K, K)`` matrix of ``(N, K, K)`` with its eigenvalues replaced by
    their absolute values (floored at 1e-10 of the largest): positive definite. Matrices with
    a Cholesky factor are returned as they are (symmetrized); only the others go through the
    eigensolver. Non-finite matrices become the identity; where the eigensolver fails
    (extreme entries), ``diag(|H_jj|)`` stands in."""
    hess = 0.5 * (hess + hess.transpose(-1, -2))
    bad = (torch.linalg.cholesky_ex(hess).info != 0) | ~torch.isfinite(hess).all(-1).all(-1)
    if not bool(bad.any()):  # all positive definite: |H| = H (no eigensolver needed)
        return hess
    bad = bad.nonzero().squeeze(-1)
    out = hess.clone()
    out[bad] = _absolute_eigenvalues(hess[bad])
    return out


def _absolute_eigenvalues(hess: Tensor) -> Tensor:
    """:func:`absolute_eigenvalues` by the symmetric eigensolver, ``(n, K, K)``."""
    finite = torch.isfinite(hess).all(-1).all(-1)
    eye = torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device)
    hess = torch.where(finite[:, None, None], hess, eye)
    scale = hess.abs().amax((-1, -2), keepdim=True).clamp(min=1e-300)
    try:
        evals, evecs = torch.linalg.eigh(hess / scale)
    except RuntimeError:  # torch.linalg.LinAlgError: fall back to the absolute diagonal
        diag = torch.diagonal(hess, dim1=-2, dim2=-1).abs()
        return torch.diag_embed(diag.clamp(min=1e-10 * scale[..., 0].clamp(max=1e300)))
    top = evals.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    evals = evals.abs().clamp(min=1e-10 * top) * scale[..., 0]
    return evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)


def _damped_solve(pd: Tensor, grad: Tensor, lam: Tensor) -> Tensor:
    """Solve (|H| + λ diag|H|) δ = -g per subject; |H| ``(N, K, K)`` (from
    :func:`absolute_eigenvalues`), g ``(N, K)``, λ ``(N,)`` → δ ``(N, K)``.

    Subjects with a non-finite gradient get δ = 0."""
    diag = torch.diagonal(pd, dim1=-2, dim2=-1)
    chol = torch.linalg.cholesky(pd + torch.diag_embed(lam[:, None] * diag))
    grad = torch.where(torch.isfinite(grad), grad, 0.0)
    return -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)


def _limit(step: Tensor, scale: Tensor | None, max_step: float | None) -> Tensor:
    """Shrink each subject's step ``(n, K)`` so that no |δ_j| exceeds ``max_step · scale_j``
    (``scale`` ``(K,)``: prior SDs of η); the direction is kept."""
    if scale is None or max_step is None:
        return step
    ratio = (step.abs() / (max_step * scale)).amax(-1, keepdim=True).clamp(min=1.0)
    return step / ratio


def _prior_sd(joint: NegLogJoint) -> Tensor | None:
    """sqrt(diag Ω) ``(K,)`` of the joint's model (detached), None if it has no η."""
    model = joint.model
    return model.eta_sd().detach() if model.n_eta else None


def chord_steps(
    joint: NegLogJoint,
    eta0: Tensor,
    hessian0: Tensor,
    pop: Population,
    variance0: Tensor | None,
    options: InnerOptions,
    rate0: Tensor | None = None,
    tangent0: ModesTangent | None = None,
    finish: Callable[[Tensor], ModesEvaluation] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, ModesEvaluation | None]:
    """Approach the modes by steps η ← η - B⁻¹ ∇l(η) with a stored curvature ``B = |H₀|``
    (chord method).

    ``hessian0`` ``(N, K, K)`` is the Hessian at the modes of a nearby evaluation (the
    previous fixed effects, the same subjects), ``eta0`` those modes. Each step costs one
    gradient instead of a Hessian. Where derivatives come from differences of values in one
    small batch (:func:`use_values`), a Hessian costs no more than a gradient: then ``B`` is
    the exact |H| at each point (Newton steps, kept only where l falls). A subject stops at
    ``gtol``, after ``chord_iter`` steps, or as soon as a step does not lower its l (with a
    stored curvature also when its gradient does not halve: the curvature has changed too
    much, and further steps could wander towards another local minimum); :func:`find_modes`
    goes on with damped Newton steps.
    With exact Hessians, a subject whose next Newton step is predicted to end within ``gtol``
    (quadratic convergence: the gradient after a step ≈ ``c·|g|²``, by a margin
    :data:`PREDICTION_MARGIN`) takes that step without an evaluation of its own: the
    evaluation at the modes that follows checks it (``predicted``). ``c`` (the subject's
    convergence constant) is measured by its last step here, or for the first step taken from
    ``rate0`` ``(N,)`` (NaN: unknown), as :func:`find_modes` measured it in an earlier search.
    With ``tangent0`` (the solves of the evaluation at ``eta0`` with their derivatives,
    :class:`ModesTangent`), the derivatives at ``eta0`` are predicted without a solve
    (:func:`value_derivatives`); a first step from them is kept where it halves the gradient.
    With ``finish`` (the evaluation at the modes of :func:`find_modes`, for η ``(N, K)`` of
    all subjects), a step from exact derivatives whose end is predicted near convergence for
    every subject still moving (``c·|g|²`` below :data:`FINISH_MARGIN` ``· gtol``) is
    evaluated by ``finish`` instead of an evaluation of the search: where that ends the
    search (every subject below ``gtol``), it is the evaluation at the modes, one solve
    fewer; otherwise its values serve the search as an evaluation of its own would have (a
    graph built for nothing, a small part of a solve's cost).
    Returns η ``(N, K)``, ``done`` ``(N,)``: the subjects whose gradient is below ``gtol`` (or
    predicted to be), ``predicted`` ``(N,)``: those of them only predicted, ``before``
    ``(N,)``: the max |gradient| before each subject's last step where that was a full Newton
    step with an exact Hessian (NaN otherwise), from which ``c`` is measured at the modes,
    and the evaluation by ``finish`` where it ended the search (else None).
    """
    eta = eta0.detach().clone()
    scale = _prior_sd(joint)
    done = torch.zeros(eta.shape[0], dtype=torch.bool, device=eta.device)
    predicted = torch.zeros_like(done)
    before = eta.new_full((eta.shape[0],), float("nan"))
    exact = use_values(joint, options, *eta.shape)  # Hessians cost no more than gradients

    def evaluate(at: Tensor, sub: Population, sub_v0: Tensor | None):
        if exact:
            return value_derivatives(joint, at, sub, sub_v0, options)
        return *search_value_and_grad(joint, at, sub, sub_v0, options), None

    from_tangent = False
    if exact:
        f, g, hess = value_derivatives(joint, eta, pop, variance0, options, tangent=tangent0)
        from_tangent = tangent0 is not None and tangent0.used
        curvature = absolute_eigenvalues(hess)
    else:
        curvature = absolute_eigenvalues(hessian0.detach())
    chol, info = torch.linalg.cholesky_ex(curvature)
    active = (info == 0).nonzero().squeeze(-1)
    curvature, chol = curvature[active], chol[active]
    sub, sub_v0 = _restrict(pop, variance0, active, len(eta))
    if exact:
        f, g = f[active], g[active]
    else:
        f, g, _ = evaluate(eta[active], sub, sub_v0)
    # exact: each active subject's convergence constant c (NaN: unknown)
    rate = None
    if exact and rate0 is not None:
        rate = rate0[active].to(eta.dtype)
    for step_no in range(options.chord_iter + 1):
        gmax = g.abs().amax(-1)
        small = gmax < options.gtol
        done[active] = small
        go_on = ~small & torch.isfinite(gmax)
        if step_no == options.chord_iter or not bool(go_on.any()):
            break
        if not bool(go_on.all()):
            active, f, g, gmax = active[go_on], f[go_on], g[go_on], gmax[go_on]
            curvature, chol = curvature[go_on], chol[go_on]
            rate = None if rate is None else rate[go_on]
            sub, sub_v0 = _restrict(pop, variance0, active, len(eta))
        newton = -torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
        step = _limit(newton, scale, options.max_step)
        trial = eta[active] + step
        full = (step == newton).all(-1)
        if rate is not None:  # Newton steps whose end is predicted converged: no evaluation
            sure = full & (PREDICTION_MARGIN * rate * gmax**2 < options.gtol)
            if bool(sure.any()):
                eta[active[sure]] = trial[sure]
                done[active[sure]] = True
                predicted[active[sure]] = True
                before[active[sure]] = gmax[sure]
                if bool(sure.all()):
                    break
                rest = ~sure
                active, f, g, gmax, step = active[rest], f[rest], g[rest], gmax[rest], step[rest]
                curvature, chol, trial = curvature[rest], chol[rest], trial[rest]
                full, rate = full[rest], rate[rest]
                sub, sub_v0 = _restrict(pop, variance0, active, len(eta))
        final = None
        if (  # likely the last step: evaluated as the evaluation at the modes (see above)
            finish is not None
            and exact
            and not from_tangent
            and rate is not None
            and bool((full & (rate * gmax**2 < FINISH_MARGIN * options.gtol)).all())
        ):
            at = eta.clone()
            at[active] = trial
            final = finish(at)
            f_new, g_new, h_new = (
                v.detach()[active] for v in (final.nll, final.grad, final.hessian)
            )
        else:
            f_new, g_new, h_new = evaluate(trial, sub, sub_v0)
        gmax_new = g_new.abs().amax(-1)
        finite = torch.isfinite(f_new) & torch.isfinite(g_new).all(-1)
        better = (f_new <= f + 1e-13 * (1.0 + f.abs())) & finite
        tangent_step = from_tangent
        if exact:  # also a step that halves the gradient where l cannot resolve its decrease
            expected = -0.5 * (step * g).sum(-1)  # decrease of the quadratic model
            unresolved = expected <= VALUE_NOISE * (1.0 + f.abs())
            if from_tangent:  # l was predicted, to first order: any step halving the gradient
                unresolved, from_tangent = torch.ones_like(unresolved), False
            better = better | (finite & unresolved & (gmax_new <= 0.5 * gmax))
        eta[active] = torch.where(better[:, None], trial, eta[active])
        done[active] = better & (gmax_new < options.gtol)
        if exact:  # Newton: the exact |H| at the new point
            before[active] = torch.where(better & full, gmax, before[active])
            keep = better
            updated = absolute_eigenvalues(h_new)
            chol_new, info = torch.linalg.cholesky_ex(updated)
            fine = (info == 0)[:, None, None]
            curvature = torch.where(fine, updated, curvature)
            chol = torch.where(fine, chol_new, chol)
            measured = torch.where(full, gmax_new / gmax**2, float("nan"))
            if rate is not None:  # a gradient below the noise level of differences says little
                measured = torch.where(gmax_new < RATE_NOISE, rate, measured)
                if tangent_step:  # a step from predicted derivatives: their error is in it too
                    measured = torch.where(torch.isnan(rate), measured, rate)
            rate = measured[keep]
        else:  # the stored curvature serves while the gradient at least halves per step
            keep = better & (gmax_new <= 0.5 * gmax)
        if final is not None and bool(better.all()) and final.below(options.gtol):
            return eta, done, predicted, before, final
        if not bool(keep.any()):
            break
        curvature, chol = curvature[keep], chol[keep]
        active, f, g = active[keep], f_new[keep], g_new[keep]
        if not bool(keep.all()):
            sub, sub_v0 = _restrict(pop, variance0, active, len(eta))
    return eta, done, predicted, before, None


#: Margin of the prediction that a Newton step converges (:func:`chord_steps`): the step is
#: taken unchecked where ``c·|g|²`` (``c = |g| / |g_before|²`` from the last step) is below
#: ``gtol`` / this margin.
PREDICTION_MARGIN = 100.0

#: Margin of the prediction that a step of :func:`chord_steps` ends the search (then
#: evaluated as the evaluation at the modes): ``c·|g|²`` below this many ``gtol``. Where the
#: prediction fails, the evaluation still serves the search: a wider margin costs little.
FINISH_MARGIN = 10.0

#: Gradients below this level (those from differences of values are accurate to ~1e-9) do
#: not measure a subject's convergence constant (:func:`chord_steps`, :func:`find_modes`).
RATE_NOISE = 1e-8

#: Relative level below which a decrease of l found by differences of values is not
#: resolved (rounding and the adaptive solver's steps, which differ between evaluations).
VALUE_NOISE = 1e-9


def use_differences(joint: NegLogJoint, options: InnerOptions) -> bool:
    """Whether η-Hessians are taken by differences (see ``InnerOptions.hessian``)."""
    if options.hessian not in ("auto", "autograd", "differences"):
        raise ValueError(
            f"inner hessian must be 'auto', 'autograd' or 'differences', got {options.hessian!r}"
        )
    if options.hessian == "auto":
        dynamics = getattr(joint.model, "dynamics", None)
        return bool(getattr(dynamics, "difference_hessians", False))
    return options.hessian == "differences"


#: The tightest inner ``gtol`` served by gradients from differences of values.
VALUE_GTOL = 1e-7


def use_values(joint: NegLogJoint, options: InnerOptions, n: int, k: int) -> bool:
    """Whether the derivatives of ``n`` subjects' l (``k`` η each) come from differences of
    values (:func:`value_derivatives`; see ``InnerOptions.value_differences``): for small
    batches, and only where ``gtol`` is at least :data:`VALUE_GTOL` (their gradients are
    accurate to ~1e-9: a tighter tolerance needs reverse mode)."""
    return (
        k > 0
        and use_differences(joint, options)
        and options.gtol >= VALUE_GTOL
        and n * (2 * k * k + 2 * k + 1) <= options.value_differences
    )


def _stencil(k: int, step: float, step_h: float, hessian: bool, like: Tensor) -> Tensor:
    """Shifts ``(P, K)`` of :func:`value_derivatives`: 0; ±step·e_j; and with ``hessian``
    ±step_h·e_j and (±step_h·e_j ± step_h·e_m) for j < m."""
    eye = torch.eye(k, dtype=like.dtype, device=like.device)
    parts = [like.new_zeros(1, k), step * eye, -step * eye]
    if hessian:
        parts += [step_h * eye, -step_h * eye]
        j, m = torch.triu_indices(k, k, 1, device=like.device)
        for sj, sm in ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)):
            parts.append(step_h * (sj * eye[j] + sm * eye[m]))
    return torch.cat(parts)


def value_derivatives(
    joint: NegLogJoint,
    eta: Tensor,
    pop: Population,
    variance0: Tensor | None,
    options: InnerOptions,
    hessian: bool = True,
    graph: bool = False,
    jacobians: list | None = None,
    tangent: ModesTangent | None = None,
    record: list | None = None,
    later: list | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(l, ∂l/∂η, ∂²l/∂η²)`` at η ``(N, K)``: ``(N,)``, ``(N, K)``, ``(N, K, K)`` (None
    without ``hessian``) from values of l alone, all points evaluated as one batch: central
    differences with step ``difference_step`` for the gradient, second differences with step
    ``value_hessian_step`` for the Hessian (2K²+2K+1 points; K=3: 25). Rows of one subject
    are copies of it, so an adaptive ODE solver gives them one step sequence and the
    differences are smooth. With ``graph`` the results are linear combinations of the values
    with their graphs to the model's parameters and to ``eta``: their derivatives need one
    first-order reverse pass, no derivative of a derivative. Error ~1e-9 (gradient) and
    ~1e-8 of the largest entry (Hessian) in float64. A list passed as ``jacobians`` receives
    ``(terms, ∂mean/∂η, ∂variance/∂η)`` from the same points (Gaussian residuals; as
    :meth:`NegLogJoint.gaussian_jacobians_by_differences` with step ``difference_step``).
    A ``tangent`` recorded at the same η and subjects (``record`` of an earlier evaluation
    with ``graph``, at other parameters) predicts the values without solves, to first order
    in the change of the solves' parameters (``tangent.used`` says whether it served); a
    list passed as ``record`` receives the :class:`ModesTangent` of this evaluation. With a
    list passed as ``later``, the reverse pass of linearized solves waits: the results come
    back detached, and ``later`` receives the call that attaches their graphs and returns
    them with those (and fills ``record``); an evaluation that turns out not to be needed
    then costs no reverse pass."""
    n, k = eta.shape
    step, step_h = options.difference_step, options.value_hessian_step
    shifts = _stencil(k, step, step_h, hessian, eta)
    n_points = shifts.shape[0]
    index = torch.arange(n, device=eta.device).repeat(n_points)
    batch = pop.subset(index)
    v0 = None if variance0 is None else variance0[index][:, : batch.obs_time.shape[1]]
    base = eta if graph else eta.detach()
    # with a graph for l alone, a solve's gradients are taken once (linearized solves)
    separable = linearizing_solves() if graph and jacobians is None else nullcontext()
    predict = nullcontext()
    if tangent is not None:
        tangent.used = False
        if not graph and _same(tangent.eta, eta) and _same(tangent.subjects, pop.subject_index):
            predict = predicting_solves(tangent.tangents)
    with torch.set_grad_enabled(graph), separable as lin, predict as pred:
        points = (base[None] + shifts[:, None, :]).reshape(-1, k)
        every = joint(points, batch, v0)
        if jacobians is not None and every.mean is not None:
            jacobians.append(joint.jacobians_from_points(every, n, k, step))

        def attached() -> tuple[Tensor, Tensor, Tensor | None]:
            """The results with the linearized solves' first derivatives attached."""
            with torch.enable_grad():
                nll = lin.attach(every.nll)
                if record is not None and lin.tangents:
                    record.append(ModesTangent(eta.detach(), pop.subject_index, lin.tangents))
                return _from_values(nll.reshape(n_points, n), k, step, step_h, hessian)

        if lin is not None:
            if later is None or not lin.solves:
                return attached()
            later.append(attached)
            return _from_values(every.nll.detach().reshape(n_points, n), k, step, step_h, hessian)
        nll = every.nll
        if pred is not None and pred.taken:
            nll = nll + pred.correction
            tangent.used = True
        return _from_values(nll.reshape(n_points, n), k, step, step_h, hessian)


def _from_values(
    values: Tensor, k: int, step: float, step_h: float, hessian: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(l, ∂l/∂η, ∂²l/∂η²)`` from l at the points of :func:`_stencil`, ``values``
    ``(P, N)`` (:func:`value_derivatives`)."""
    n = values.shape[1]
    f = values[0]
    grad = ((values[1 : k + 1] - values[k + 1 : 2 * k + 1]) / (2 * step)).T
    if not hessian:
        return f, grad, None
    plus, minus = values[2 * k + 1 : 3 * k + 1], values[3 * k + 1 : 4 * k + 1]
    diag = (plus - 2.0 * f + minus) / step_h**2  # (K, N)
    n_pairs = k * (k - 1) // 2
    pp, pm, mp, mm = values[4 * k + 1 :].reshape(4, n_pairs, n)
    off = (pp - pm - mp + mm) / (4.0 * step_h**2)  # (pairs, N)
    j, m = torch.triu_indices(k, k, 1, device=values.device)
    d = torch.arange(k, device=values.device)
    hess = diag.new_zeros(n, k, k)  # (N, K, K)
    hess[:, d, d] = diag.T
    hess[:, j, m] = off.T
    hess[:, m, j] = off.T
    return f, grad, hess


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b.detach()))


def search_value_and_grad(
    joint: NegLogJoint,
    eta: Tensor,
    pop: Population,
    variance0: Tensor | None,
    options: InnerOptions,
) -> tuple[Tensor, Tensor]:
    """l ``(N,)`` and ∂l/∂η ``(N, K)`` at η for the search (detached): by central
    differences of values where :func:`use_values` says so, else by reverse mode."""
    if use_values(joint, options, *eta.shape):
        f, g, _ = value_derivatives(joint, eta, pop, variance0, options, hessian=False)
        return f, g
    _, f, g = joint.value_and_grad(eta, pop, variance0)
    return f, g


def difference_hessian(
    joint: NegLogJoint,
    eta: Tensor,
    pop: Population,
    variance0: Tensor | None,
    step: float,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(l, ∂l/∂η, ∂²l/∂η²)`` at η ``(N, K)``: ``(N,)``, ``(N, K)``, ``(N, K, K)``, the
    Hessian by central differences of exact gradients at η ± step·e_j, all 2K+1 points
    evaluated as one batch of (2K+1)·N subjects (error O(step²) plus the gradients' rounding
    over step). With ``create_graph`` all three keep their graphs to the model's parameters
    and to ``eta`` (then a tensor requiring grad); otherwise they are detached."""
    n, k = eta.shape
    eye = torch.eye(k, dtype=eta.dtype, device=eta.device)
    shifts = torch.cat([eta.new_zeros(1, k), step * eye, -step * eye])  # (2K+1, K)
    index = torch.arange(n, device=eta.device).repeat(2 * k + 1)
    batch = pop.subset(index)
    v0 = None if variance0 is None else variance0[index][:, : batch.obs_time.shape[1]]
    with torch.enable_grad():
        base = eta if create_graph else eta.detach()
        points = (base[None] + shifts[:, None, :]).reshape(-1, k)
        if not points.requires_grad:
            points.requires_grad_(True)
        _, f, g = joint.value_and_grad(points, batch, v0, create_graph=create_graph)
    g = g.reshape(2 * k + 1, n, k)
    hess = ((g[1 : k + 1] - g[k + 1 :]) / (2 * step)).transpose(0, 1)  # rows j: ∂g/∂η_j
    return f[:n], g[0], 0.5 * (hess + hess.transpose(-1, -2))


def _restrict(
    pop: Population, variance0: Tensor | None, index: Tensor, n: int
) -> tuple[Population, Tensor | None]:
    """The subjects at ``index`` of ``pop`` (``n`` subjects) and their η = 0 variances."""
    if index.numel() == n:
        return pop, variance0
    sub = pop.subset(index)
    return sub, None if variance0 is None else variance0[index][:, : sub.obs_time.shape[1]]


def newton_steps(
    joint: NegLogJoint,
    eta0: Tensor,
    pop: Population,
    variance0: Tensor | None,
    options: InnerOptions,
    done: Tensor | None = None,
) -> tuple[Tensor, int, Tensor]:
    """Damped Newton iterations (module docstring) from ``eta0`` ``(N, K)`` until every subject
    not already ``done`` has max |∂l/∂η| < ``gtol``, stalls, or ``max_iter`` is reached.

    Each iteration evaluates only the subjects still moving. Where derivatives come from
    differences of values (:func:`use_values`), the first trial of each iteration's step is
    evaluated with its derivatives: a subject that takes it starts the next iteration from
    them instead of from an evaluation of its own. Returns η ``(N, K)``, the number of
    iterations, and ``stalled`` ``(N,)``: subjects whose damping hit ``lambda_max`` (no lower
    l to be found: the precision limit).
    """
    eta = eta0.detach().clone()
    scale = _prior_sd(joint)
    n = eta.shape[0]
    lam = eta.new_zeros(n)  # 0: plain Newton step (on the absolute-eigenvalue Hessian)
    stalled = torch.zeros(n, dtype=torch.bool, device=eta.device)
    active = torch.arange(n, device=eta.device) if done is None else (~done).nonzero()[:, 0]
    sub, sub_v0 = _restrict(pop, variance0, active, n)
    it = 0
    differences = use_differences(joint, options)
    known = _KnownDerivatives(eta)  # (l, ∇l, ∇²l) at the current η of some subjects
    while active.numel() and it < options.max_iter:
        values = differences and use_values(joint, options, *eta[active].shape)
        if values:
            f, g, hess = known.take(active, pop, variance0, joint, eta, options)
        elif differences:
            f, g, hess = difference_hessian(
                joint, eta[active], sub, sub_v0, options.difference_step
            )
        else:
            leaf, f, g_graph = joint.value_and_grad(eta[active], sub, sub_v0, create_graph=True)
            f, g = f.detach(), g_graph.detach()
        moving = (g.abs().amax(-1) >= options.gtol) & ~stalled[active]
        if not bool(moving.any()):
            break
        it += 1
        if not differences:
            hess = joint.hessian(g_graph, leaf)
        pd = absolute_eigenvalues(hess)
        if not bool(moving.all()):
            active, f, g, pd = active[moving], f[moving], g[moving], pd[moving]
            sub, sub_v0 = _restrict(pop, variance0, active, n)
        # Damped steps until each moving subject found a lower l or its λ hit the cap.
        e, lam_a = eta[active], lam[active]
        noise = 1e-13 * (1.0 + f.abs())  # rounding level of l: no real change below it
        trying = torch.ones_like(f, dtype=torch.bool)
        first = values
        while bool(trying.any()):
            step = _limit(_damped_solve(pd, g, lam_a), scale, options.max_step)
            if first:  # with its derivatives: kept where the step is taken
                trial, g_t, h_t = value_derivatives(joint, e + step, sub, sub_v0, options)
            else:
                trial = joint(e + step, sub, sub_v0).nll
            better = trying & (trial <= f + noise) & torch.isfinite(trial)
            if first:
                known.keep(active[better], trial[better], g_t[better], h_t[better])
                first = False
            e = torch.where(better[:, None], e + step, e)
            lam_a = torch.where(better, lam_a / 3.0, lam_a)
            lam_a = torch.where(lam_a < 1e-9, 0.0, lam_a)
            failed = trying & ~better
            grown = torch.where(lam_a == 0, options.lambda_first, lam_a * 4.0)
            lam_a = torch.where(failed, grown, lam_a)
            trying = failed & (lam_a <= options.lambda_max)
        eta[active], lam[active] = e, lam_a
        stalled[active] = lam_a > options.lambda_max
    return eta, it, stalled


class _KnownDerivatives:
    """(l, ∇l, ∇²l) of some subjects at their current η (:func:`newton_steps`): kept from an
    evaluation of the step they took, used once."""

    def __init__(self, eta: Tensor):
        n, k = eta.shape
        self.valid = torch.zeros(n, dtype=torch.bool, device=eta.device)
        self.f, self.g, self.h = eta.new_zeros(n), eta.new_zeros(n, k), eta.new_zeros(n, k, k)

    def keep(self, index: Tensor, f: Tensor, g: Tensor, h: Tensor) -> None:
        """Derivatives ``(M,)``, ``(M, K)``, ``(M, K, K)`` of the subjects ``index``."""
        self.valid[index] = True
        self.f[index], self.g[index], self.h[index] = f, g, h

    def take(self, active: Tensor, pop, variance0, joint, eta: Tensor, options) -> tuple:
        """(l, ∇l, ∇²l) of the subjects ``active`` at ``eta[active]``: those kept, the others
        evaluated (:func:`value_derivatives`); then none are kept."""
        need = ~self.valid[active]
        if bool(need.all()):
            sub, sub_v0 = _restrict(pop, variance0, active, len(eta))
            out = value_derivatives(joint, eta[active], sub, sub_v0, options)
        else:
            out = self.f[active], self.g[active], self.h[active]
            if bool(need.any()):
                rows = need.nonzero()[:, 0]
                sub, sub_v0 = _restrict(pop, variance0, active[rows], len(eta))
                fresh = value_derivatives(joint, eta[active[rows]], sub, sub_v0, options)
                for part, new in zip(out, fresh, strict=True):
                    part[rows] = new
        self.valid[:] = False
        return out


def far_modes(joint: NegLogJoint, eta: Tensor, options: InnerOptions) -> Tensor:
    """Indices of the modes ``eta`` ``(N, K)`` beyond ``restart_sd`` prior SDs (none where
    ``restart_sd`` is None or the model has no η)."""
    scale = _prior_sd(joint)
    if options.restart_sd is None or scale is None:
        return torch.zeros(0, dtype=torch.long, device=eta.device)
    return ((eta / scale).abs().amax(-1) > options.restart_sd).nonzero()[:, 0]


def restart_far(
    joint: NegLogJoint,
    eta: Tensor,
    stalled: Tensor,
    pop: Population,
    variance0: Tensor | None,
    options: InnerOptions,
) -> tuple[Tensor, Tensor]:
    """Modes ``eta`` ``(N, K)`` beyond ``restart_sd`` prior SDs, searched again from η = 0:
    where that search ends at a lower l, its mode (and its ``stalled`` flag ``(N,)``) replaces
    the first. Returns η ``(N, K)`` and ``stalled``."""
    far = far_modes(joint, eta, options)
    if not far.numel():
        return eta, stalled
    sub, sub_v0 = _restrict(pop, variance0, far, eta.shape[0])
    alt, _, alt_stalled = newton_steps(joint, torch.zeros_like(eta[far]), sub, sub_v0, options)
    f_far, f_alt = joint(eta[far], sub, sub_v0).nll, joint(alt, sub, sub_v0).nll
    lower = f_alt < f_far - 1e-9 * (1.0 + f_far.abs())
    eta, stalled = eta.clone(), stalled.clone()
    eta[far[lower]], stalled[far[lower]] = alt[lower], alt_stalled[lower]
    return eta, stalled


def reusing_steps(joint: NegLogJoint, memory=None) -> AbstractContextManager:
    """Where the model's dynamics can reuse an adaptive solver's steps between solves
    (``OdeDynamics.reusing_steps``: the solves of a search, or with ``memory``, which the
    context yields, those of an estimator's successive evaluations), that context; otherwise
    one that yields None."""
    reuse = getattr(getattr(joint.model, "dynamics", None), "reusing_steps", None)
    return reuse(memory) if reuse is not None else nullcontext()


def _at_modes(
    joint: NegLogJoint,
    leaf: Tensor,
    pop: Population,
    variance0: Tensor | None,
    opts: InnerOptions,
    keep_graph: bool,
    hessian_graph: bool,
    jacobians: bool,
    defer: bool = False,
) -> ModesEvaluation:
    """The evaluation of :func:`find_modes` at its modes ``leaf`` ``(N, K)``: l ``(N,)``,
    ∂l/∂η ``(N, K)``, ∂²l/∂η² ``(N, K, K)``, with ``jacobians`` the Gaussian Jacobians where
    the evaluation provides them, and its :class:`ModesTangent` where it has one. With
    ``defer``, graphs whose reverse pass can wait are left pending
    (:meth:`ModesEvaluation.completed`)."""
    record: list = []
    pending = None
    with torch.enable_grad():
        gaussian = [] if jacobians else None
        if use_values(joint, opts, *leaf.shape):
            later: list | None = [] if defer else None
            nll, grad, hess = value_derivatives(
                joint, leaf, pop, variance0, opts, graph=keep_graph, jacobians=gaussian,
                record=record, later=later,
            )
            pending = later[0] if later else None
        elif use_differences(joint, opts):
            nll, grad, hess = difference_hessian(
                joint, leaf, pop, variance0, opts.difference_step, create_graph=keep_graph
            )
        else:
            nll, grad, hess = joint.exact_hessian(
                leaf, pop, variance0, create_graph=keep_graph and hessian_graph
            )
    return ModesEvaluation(leaf, nll, grad, hess, gaussian, record, pending)


def find_modes(
    joint: NegLogJoint,
    eta0: Tensor,
    pop: Population,
    variance0: Tensor | None = None,
    options: InnerOptions | None = None,
    keep_graph: bool = False,
    hessian0: Tensor | None = None,
    hessian_graph: bool = True,
    jacobians: bool = False,
    rate0: Tensor | None = None,
    tangent0: ModesTangent | None = None,
) -> InnerResult:
    """Minimize l_i(η) for every subject from ``eta0`` ``(N, K)``.

    ``hessian0`` ``(N, K, K)``, the Hessians at ``eta0`` when those are the modes of a nearby
    evaluation, lets cheap chord steps (:func:`chord_steps`) do most of the work first; damped
    Newton steps (:func:`newton_steps`) finish; from a warm start, modes far out get a second
    search from η = 0 (:func:`restart_far`). The search builds no graph to the model's
    parameters; one evaluation of l, ∂l/∂η and ∂²l/∂η² at the modes follows, whose results
    keep their graphs with ``keep_graph`` (the Laplace objective and its implicit gradient are
    built from them); ``hessian_graph=False`` detaches the Hessian nonetheless (FOCE-type
    objectives only need its value). With ``jacobians``, the result's ``gaussian`` holds the
    Gaussian Jacobians at the modes where the final evaluation provides them (FOCE-type
    objectives; None otherwise). ``rate0`` ``(N,)``: the subjects' convergence constants from
    an earlier search (``InnerResult.rate``) and ``tangent0`` the solves of its evaluation at
    the modes ``eta0`` (``InnerResult.tangent``), for :func:`chord_steps`.
    """
    opts = options or InnerOptions()
    eta = eta0.detach()
    if eta.shape[0] == 0:
        k = eta.shape[-1]
        empty = torch.zeros(0, dtype=torch.bool, device=eta.device)
        return InnerResult(eta, eta.new_zeros(0), eta, eta.new_zeros(0, k, k), eta, 0, empty)
    v_search = None if variance0 is None else variance0.detach()
    v_final = variance0 if keep_graph or variance0 is None else variance0.detach()

    def evaluate_at(at: Tensor, defer: bool = False) -> ModesEvaluation:
        leaf = at.detach().requires_grad_(True)
        return _at_modes(
            joint, leaf, pop, v_final, opts, keep_graph, hessian_graph, jacobians, defer
        )

    def finish(at: Tensor) -> ModesEvaluation:  # chord_steps' evaluation ending the search
        return evaluate_at(at, defer=True)

    warm = bool(eta0.detach().abs().max() > 0)
    done = predicted = before = final = None
    n_iter, stalled = 0, torch.zeros(eta.shape[0], dtype=torch.bool, device=eta.device)
    with torch.no_grad(), reusing_steps(joint):
        if hessian0 is not None and opts.chord_iter > 0:
            eta, done, predicted, before, final = chord_steps(
                joint, eta, hessian0, pop, v_search, opts, rate0, tangent0, finish
            )
            before = torch.where(done, before, float("nan"))  # moved by Newton steps below
        if final is not None and warm and far_modes(joint, eta, opts).numel():
            final = None  # a far mode is searched again (restart_far)
        if final is None:
            eta, n_iter, stalled = newton_steps(joint, eta, pop, v_search, opts, done)
            if warm:  # warm-started: far modes get a second look
                eta, stalled = restart_far(joint, eta, stalled, pop, v_search, opts)
    for _ in range(2):
        if final is None:
            final = evaluate_at(eta)
        # steps predicted to converge (chord_steps) that did not: Newton steps, evaluated again
        missed = None if predicted is None else predicted & ~_below(final.grad, opts.gtol)
        if missed is None or not bool(missed.any()):
            break
        with torch.no_grad(), reusing_steps(joint):
            eta, more, stalled_more = newton_steps(joint, eta, pop, v_search, opts, ~missed)
        n_iter += more
        stalled = stalled | stalled_more
        before = torch.where(missed, float("nan"), before)
        predicted = final = None
    final = final.completed()
    leaf, nll, grad, hess, gaussian, record = (
        final.leaf, final.nll, final.grad, final.hessian, final.gaussian, final.record
    )
    if not keep_graph:
        nll, grad = nll.detach(), grad.detach()
    if not (keep_graph and hessian_graph):
        hess = hess.detach()
    gmax = grad.detach().abs().amax(-1)
    converged = (gmax < opts.gtol) | (stalled & (gmax < opts.gtol * 1e3))
    found = gaussian[0] if gaussian else None
    rate = None
    if before is not None:
        rate = torch.where(gmax >= RATE_NOISE, gmax / before**2, float("nan"))
    tangent = record[0] if record else None
    return InnerResult(eta, nll, grad, hess, leaf, n_iter, converged, found, rate, tangent)
