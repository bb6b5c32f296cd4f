"""Can a fit start here? Observations to fit and a finite objective, or one line saying why not.

An objective that is not finite where a fit starts (a zero residual variance, a log-normal
error on a zero prediction, a parameter at infinity) leaves the optimizer nothing to work with;
it would stop at once and report the initial estimates. :func:`starting_problem` names the
first observation (file row, ID, TIME, DV) whose log-density is not finite at η = 0, with what
the user can do about it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.likelihood.residual import GaussianResidual

#: Objective an estimator reports where its value is not finite: far above any real value yet
#: finite, so that cubic interpolation in a line search stays finite too.
INFEASIBLE_LOSS = 1e15


def feasible(loss: float) -> bool:
    """True for an objective value that is finite and not the :data:`INFEASIBLE_LOSS` barrier."""
    return math.isfinite(loss) and loss < INFEASIBLE_LOSS


class ObjectiveError(ValueError):
    """A fit cannot start: no observations, or an objective that is not finite there.

    The message is one line, naming the file, row and column where the cause is an observation.
    """


def _num(value: float) -> str:
    return format(float(value), ".6g")


def _where(pop: Population, column: str, row0: int | None) -> str:
    """``"{source}: row r, column NAME"`` (row 0: the table as a whole)."""
    name = pop.meta.get("columns", {}).get(column, column)
    row = 0 if row0 is None else row0 + 1
    return f"{pop.source or 'data'}: row {row}, column {name}"


def no_observations(pop: Population) -> str | None:
    """Why ``pop`` has nothing to fit, or None when it has observations."""
    if pop.n_obs > 0:
        return None
    if pop.meta.get("n_obs", 0) > 0:
        return (
            f"{_where(pop, 'DV', None)}: the {len(pop)} subjects to fit have no observations "
            "(those with observations are held out); nothing to fit"
        )
    return (
        f"{_where(pop, 'DV', None)}: the table has no observations (rows with EVID 0 and MDV 0 "
        "and a DV); nothing to fit"
    )


def _prediction(dist) -> Tensor:
    return dist.prediction if isinstance(dist, GaussianResidual) else dist.mean


def _cause(dist, i: int, j: int, dv: float) -> str:
    """What makes the log-density of observation ``(i, j)`` not finite, and what to do."""
    pred = float(_prediction(dist)[i, j])
    if not math.isfinite(pred):
        return f"the prediction there is {_num(pred)}; check the initial estimates (model.init)"
    if isinstance(dist, GaussianResidual):
        var = float(dist.variance[i, j])
        if dist.log_scale and (pred <= 0 or dv <= 0):
            return (
                f"a log-normal error needs a positive DV and prediction (prediction "
                f"{_num(pred)}); use a combined error model (model.error=combined), or set MDV "
                "to 1 on observations before the first dose takes effect (e.g. pre-dose zeros)"
            )
        if var == 0:
            return (
                f"the residual variance there is 0 (prediction {_num(pred)}, and a proportional "
                "error scales with it); use a combined error model (model.error=combined), or set "
                "MDV to 1 on observations before the first dose takes effect (e.g. pre-dose zeros)"
            )
        return f"prediction {_num(pred)}, residual variance {_num(var)}"
    return f"prediction {_num(pred)}"


def starting_problem(estimator, pop: Population) -> str | None:
    """One line saying why a fit of ``estimator`` on ``pop`` cannot start here, or None.

    Checks that ``pop`` has observations and that the objective ``estimator.loss(pop)`` is
    finite at the current parameters. When it is not, names the first observation (in file
    order) whose log-density at η = 0 is not finite, else the parameters or the mode search.
    """
    problem = no_observations(pop)
    if problem is not None:
        return problem
    model = estimator.model
    with torch.enable_grad():
        loss = estimator.loss(pop)
    if feasible(float(loss.detach())):
        return None
    lead = "the log-likelihood is not finite at the starting estimates"
    with torch.no_grad():
        for name, value in model.param_values().items():
            if not bool(torch.isfinite(value).all()):
                return f"{lead}: parameter {name} is {value.cpu().tolist()}"
        eta = pop.obs_time.new_zeros(len(pop), model.n_eta)
        dist = model.observe(eta, pop)
        logp = dist.log_prob(pop.obs_dv_filled)
        bad = pop.obs_mask & ~torch.isfinite(logp)
        if bool(bad.any()):
            rows = torch.where(bad, pop.obs_row, torch.iinfo(torch.long).max)
            flat = int(rows.reshape(-1).argmin())
            i, j = divmod(flat, rows.shape[1])
            dv = float(pop.obs_dv[i, j])
            return (
                f"{_where(pop, 'DV', int(pop.obs_row[i, j]))}: ID {pop.ids[i]}, TIME "
                f"{_num(pop.obs_time[i, j])}, DV {_num(dv)}: {lead} ({model.__class__.__name__}"
                f" at η = 0): {_cause(dist, i, j, dv)}"
            )
    return (
        f"{pop.source or 'data'}: {lead}, although every observation's log-density at η = 0 "
        "is finite: the search for the random effects' modes failed; check the initial "
        "estimates (model.init) and Ω"
    )
