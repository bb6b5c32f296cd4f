"""Cost of the diagnostics of one fit: ``python3 scripts/benchmark_diagnostics.py [--n-sim 200]``.

Times, at published estimates (no fit), for phenobarbital (FOCEI, 59 subjects) and
Theophylline (Laplace, 12 subjects): the covariance step (R⁻¹ and sandwich), CWRES, NPDE with
``--n-sim`` simulations per subject, and all of :func:`deepnlme.diagnostics.write_all` with
and without plots. Wall seconds on this machine; compare them with the fit's ``fit_seconds``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from deepnlme.data import load_dataset
from deepnlme.diagnostics import evaluate, write_all
from deepnlme.diagnostics.covariance import covariance_step
from deepnlme.diagnostics.npde import npde
from deepnlme.diagnostics.residuals import conditional_residuals
from deepnlme.fitted import default_dtype
from deepnlme.inference import FOCEI, Laplace
from deepnlme.model.zoo.pk import OneCmtOralModel, PhenoModel

CASES = {
    "phenobarbital": (PhenoModel, FOCEI, {
        "tvcl": 0.0046956, "tvv": 0.98426, "apgar_v": 0.15892,
        "omega": [0.029351, 0.027906], "sigma_prop": math.sqrt(0.013241)}),
    "theophylline": (OneCmtOralModel, Laplace, {
        "tvka": 1.5789, "tvcl": 0.04004, "tvv": 0.4575,
        "omega": [0.6526**2, 0.2652**2, 0.1339**2], "sigma_add": 0.6912}),
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(data: str, model_cls, method, init: dict, n_sim: int) -> dict[str, float]:
    """Seconds of each diagnostic for one case, at the given estimates."""
    pop = load_dataset(data)
    model = model_cls(init=init)
    est = method(model)
    ev = evaluate(model, est, pop)
    gen = torch.Generator().manual_seed(0)
    return {
        "covariance R⁻¹": seconds(lambda: covariance_step(est, pop, "r")),
        "covariance sandwich": seconds(lambda: covariance_step(est, pop, "sandwich")),
        "CWRES": seconds(lambda: conditional_residuals(model, pop, ev.eta)),
        f"NPDE ({n_sim} sims)": seconds(lambda: npde(model, pop, n_sim, gen)),
        "write_all, no plots": seconds(lambda: write_all(
            tempfile.mkdtemp(), est, [ev], {}, {"n_sim": n_sim, "plots": False})),
        "write_all, with plots": seconds(lambda: write_all(
            tempfile.mkdtemp(), est, [ev], {}, {"n_sim": n_sim})),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-sim", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with default_dtype(torch.float64):
        for data, (model_cls, method, init) in CASES.items():
            for name, value in bench(data, model_cls, method, init, args.n_sim).items():
                print(f"{data:14s} {name:24s} {value:7.2f} s")


if __name__ == "__main__":
    main()
