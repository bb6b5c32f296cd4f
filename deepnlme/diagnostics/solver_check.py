"""How far a model's numerical integration is from a finer one: the integration-error check.

Models with numerically integrated dynamics (:class:`~deepnlme.dynamics.OdeDynamics` and
its subclasses) are fitted and evaluated with one solver setting. :func:`integration_error`
recomputes PRED (η = 0) and IPRED (η = η̂) of every evaluated population with the solver
refined ``factor`` times — fixed-step and exponential integrators: steps ``factor`` times
shorter (``max_step / factor``, ``min_steps · factor``; graded steps also ``step_growth`` and
``min_step / factor``); adaptive ones: tolerances
``factor²`` times tighter — and reports the relative differences. A large difference means
that the predictions (and the fit) depend on the step, not only on the model: the run then
carries a warning (``results.json`` ``warnings``) naming the setting to change.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from deepnlme.diagnostics.evaluation import Evaluation
from deepnlme.diagnostics.predictions import predict
from deepnlme.dynamics import OdeDynamics
from deepnlme.dynamics._solvers import FIXED

#: Refinement of the solver in the check (step length / factor, tolerances / factor²).
REFINEMENT = 8
#: Median relative difference of PRED or IPRED above which a run carries a warning (a fifth of
#: a typical 10% proportional residual error).
WARN_MEDIAN = 0.02


def _fixed_step(dynamics: OdeDynamics) -> bool:
    """Whether ``dynamics`` integrates with steps set by ``max_step`` / ``min_steps``."""
    return bool(getattr(dynamics, "exponential", False)) or dynamics.method in FIXED


@contextmanager
def refined(dynamics: OdeDynamics, factor: int = REFINEMENT) -> Iterator[str]:
    """Within the block, ``dynamics`` integrates ``factor`` times finer; yields a description
    of the change (e.g. ``"max_step 6 -> 0.75"``). The settings are restored afterwards."""
    names = ("max_step", "min_steps", "rtol", "atol", "step_growth", "min_step")
    saved = {k: getattr(dynamics, k) for k in names if hasattr(dynamics, k)}
    if _fixed_step(dynamics):
        if saved.get("step_growth") is not None:  # graded steps: every step / factor
            dynamics.step_growth = saved["step_growth"] / factor
            dynamics.min_step = saved["min_step"] / factor
            dynamics.max_step = saved["max_step"] / factor
            change = (
                f"step_growth {saved['step_growth']:g} -> {dynamics.step_growth:g}, min_step "
                f"{saved['min_step']:g} -> {dynamics.min_step:g}, max_step "
                f"{saved['max_step']:g} -> {dynamics.max_step:g}"
            )
        elif dynamics.max_step is not None:
            dynamics.max_step = saved["max_step"] / factor
            change = f"max_step {saved['max_step']:g} -> {dynamics.max_step:g}"
        else:
            dynamics.min_steps = saved["min_steps"] * factor
            change = f"min_steps {saved['min_steps']} -> {dynamics.min_steps}"
    else:
        dynamics.rtol, dynamics.atol = saved["rtol"] / factor**2, saved["atol"] / factor**2
        change = (
            f"rtol {saved['rtol']:g} -> {dynamics.rtol:g}, atol {saved['atol']:g} -> "
            f"{dynamics.atol:g}"
        )
    try:
        yield change
    finally:
        for name, value in saved.items():
            setattr(dynamics, name, value)


def _relative(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Median and largest |a - b| / |b| over the observed slots (``b`` the refined values)."""
    diff = ((a - b).abs() / b.abs().clamp_min(torch.finfo(b.dtype).tiny))[mask]
    if diff.numel() == 0:
        return {"median": 0.0, "max": 0.0}
    return {"median": float(diff.median()), "max": float(diff.max())}


def integration_error(
    model, evaluations: Sequence[Evaluation], factor: int = REFINEMENT
) -> dict[str, Any] | None:
    """PRED and IPRED of each evaluation against a ``factor`` times finer solver.

    Returns None for models without numerically integrated dynamics, else ``{"factor",
    "refined": description, "splits": {split: {"pred": {"median", "max"}, "ipred": {...}}}}``
    (relative differences over the observed slots).
    """
    dynamics = getattr(model, "dynamics", None)
    if not isinstance(dynamics, OdeDynamics):
        return None
    out: dict[str, Any] = {"factor": factor, "splits": {}}
    with refined(dynamics, factor) as change:
        out["refined"] = change
        for evaluation in evaluations:
            fine = predict(model, evaluation.population, evaluation.eta)
            mask = evaluation.population.obs_mask
            out["splits"][evaluation.split] = {
                "pred": _relative(evaluation.predictions.pred, fine.pred, mask),
                "ipred": _relative(evaluation.predictions.ipred, fine.ipred, mask),
            }
    return out


def integration_warnings(check: dict[str, Any] | None) -> list[str]:
    """One line per evaluated population whose median PRED or IPRED difference to the refined
    solver exceeds :data:`WARN_MEDIAN`."""
    if check is None:
        return []
    out = []
    for split, errors in check["splits"].items():
        worst = max(errors["pred"]["median"], errors["ipred"]["median"])
        if worst > WARN_MEDIAN:
            out.append(
                f"integration error: on the {split} subjects the predictions differ by a median "
                f"{worst:.1%} from a {check['factor']}x finer solver ({check['refined']}); the "
                "fit and its predictions depend on the solver setting: refine it (e.g. "
                "model.max_step or the solver tolerances)"
            )
    return out
