"""Time the ODE version of one_cmt_oral on Theophylline at the Laplace optimum.

Prints the time of Σ l_i(η) + gradient (12 subjects, random η), and of one Laplace objective
+ gradient evaluation from η = 0 (cold) and warm-started, with the log-likelihood. Run it
against another checkout to compare, e.g. ``PYTHONPATH=/path/to/checkout python3 scripts/
time_theophylline_ode.py``.
"""

from __future__ import annotations

import time

import torch

import deepnlme
from deepnlme.data import load_dataset
from deepnlme.dynamics import OdeDynamics, OneCmtOral
from deepnlme.inference import Laplace
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.optimize import objective_and_gradient
from deepnlme.model.zoo.pk import OneCmtOralModel

OPTIMUM = {
    "tvka": 1.5789,
    "tvcl": 0.04004,
    "tvv": 0.4575,
    "omega": [0.6526**2, 0.2652**2, 0.1339**2],
    "sigma_add": 0.6912,
}


def main() -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pop = load_dataset("theophylline")
    model = OneCmtOralModel(error="additive", init=OPTIMUM)
    model.dynamics = OdeDynamics.linear(OneCmtOral, rtol=1e-6, atol=1e-8)
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
    print(f"deepnlme from {deepnlme.__file__}")
    print(f"sum l_i + gradient: {t_nll:.3f} s")
    print(
        f"Laplace objective + gradient: cold {t_cold:.2f} s (loglik {cold:.6f}), "
        f"warm {t_warm:.2f} s (loglik {warm:.6f})"
    )


if __name__ == "__main__":
    main()
