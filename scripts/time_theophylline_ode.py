"""Time the ODE version of one_cmt_oral on Theophylline against the closed form.

Default: the time of Σ l_i(η) + gradient (12 subjects, random η), and of one Laplace
objective + gradient evaluation from η = 0 (cold) and warm-started, with the log-likelihood.
Run it against another checkout to compare, e.g. ``PYTHONPATH=/path/to/checkout python3
scripts/time_theophylline_ode.py``.

``--fits``: full Laplace and FOCEI fits (L-BFGS to convergence, as ``train.py``) of
``model=one_cmt_oral`` on Theophylline, closed form and ``OdeDynamics.linear(OneCmtOral)``
one after the other in this process: fit seconds (wall and CPU time of this process: on a
shared machine the CPU time is the steadier measure), evaluations, log-likelihood, estimates.
The first L-BFGS of a process imports torch modules (about 3 s); one is built before any
timing, so that this one-off cost is charged to neither fit.
"""

from __future__ import annotations

import argparse
import time

import torch

import deepnlme
from deepnlme.data import load_dataset
from deepnlme.dynamics import OdeDynamics, OneCmtOral
from deepnlme.inference import FOCEI, Laplace
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.optimize import OuterOptions, fit, make_lbfgs, objective_and_gradient
from deepnlme.model.zoo.pk import OneCmtOralModel

OPTIMUM = {
    "tvka": 1.5789,
    "tvcl": 0.04004,
    "tvv": 0.4575,
    "omega": [0.6526**2, 0.2652**2, 0.1339**2],
    "sigma_add": 0.6912,
}


def ode_model(**kw) -> OneCmtOralModel:
    """``one_cmt_oral`` (additive error) with its dynamics integrated by dopri5."""
    model = OneCmtOralModel(error="additive", **kw)
    model.dynamics = OdeDynamics.linear(OneCmtOral, rtol=1e-6, atol=1e-8)
    return model


def evaluations() -> None:
    pop = load_dataset("theophylline")
    model = ode_model(init=OPTIMUM)
    joint = NegLogJoint(model)
    eta = 0.3 * torch.randn(len(pop), 3, generator=torch.Generator().manual_seed(0))
    eta.requires_grad_(True)
    start = time.perf_counter()
    for _ in range(3):
        nll = joint(eta, pop).nll.sum()
        torch.autograd.grad(nll, [eta, *model.parameters()])
    t_nll = (time.perf_counter() - start) / 3
    est = Laplace(model)
    start = time.perf_counter()
    _, cold, _ = objective_and_gradient(est, pop)
    t_cold = time.perf_counter() - start
    start = time.perf_counter()
    _, warm, _ = objective_and_gradient(est, pop)
    t_warm = time.perf_counter() - start
    print(f"sum l_i + gradient: {t_nll:.3f} s")
    print(
        f"Laplace objective + gradient: cold {t_cold:.2f} s (loglik {cold:.6f}), "
        f"warm {t_warm:.2f} s (loglik {warm:.6f})"
    )


def fits() -> None:
    pop = load_dataset("theophylline")
    make_lbfgs([torch.zeros(1, requires_grad=True)], OuterOptions())  # one-off imports
    for method in (Laplace, FOCEI):
        seconds = {}
        for dynamics in ("closed form", "ODE"):
            model = ode_model() if dynamics == "ODE" else OneCmtOralModel(error="additive")
            est = method(model)
            cpu = time.process_time()
            result = fit(est, pop)
            cpu = time.process_time() - cpu
            seconds[dynamics] = (result.seconds, cpu)
            values = {
                k: [round(float(x), 5) for x in v.detach().flatten() if float(x) != 0.0]
                for k, v in model.param_values().items()
            }
            print(
                f"{est.name:8s} {dynamics:12s} fit {result.seconds:7.2f} s ({cpu:.2f} s CPU), "
                f"{result.n_evals} evaluations, loglik {est.loglik(pop):.4f}, "
                f"converged {result.converged}, {values}",
                flush=True,
            )
        (wall_ode, cpu_ode), (wall_cf, cpu_cf) = seconds["ODE"], seconds["closed form"]
        print(
            f"{est.name}: ODE / closed form = {wall_ode / wall_cf:.1f}x wall, "
            f"{cpu_ode / cpu_cf:.1f}x CPU"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fits", action="store_true", help="full fits, closed form and ODE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    print(f"deepnlme from {deepnlme.__file__}")
    fits() if args.fits else evaluations()


if __name__ == "__main__":
    main()
