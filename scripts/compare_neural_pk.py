"""Neural (deep compartment) vs classical one-compartment model on the synthetic PK data.

Fits the classical ``OneCmtOralModel(error="proportional")`` (no covariates), the main-job
neural model (``neural``: (covariates, η) -> network, plus the η skip; the first-layer weights
on η carry the stronger L2 prior ``eta_weight_decay``), the covariates-only network
(``neural-cov``: η through the skip alone) and the η-input network without the stronger prior
(``neural+eta``: every weight at ``weight_decay``) by Laplace + L-BFGS in float64 on the fit
split (75% of subjects, seeded; inner settings of ``configs/method/laplace.yaml``), then
evaluates on the held-out subjects with the parameters
fixed: marginal log-likelihood (η̂ from each held-out subject's own data), RMSE of individual
predictions at η̂ (IPRED) and of population predictions at η = 0 (PRED). The same metrics of
the true data-generating model (every parameter at its true value) are the reference.

    PYTHONPATH=. python scripts/compare_neural_pk.py [--seed 0] [--hidden 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from deepnlme import diagnostics
from deepnlme.data.population import Population
from deepnlme.data.split import split_heldout
from deepnlme.data.synthetic import COVARIATES, TRUTH, synthetic_pk, true_parameters
from deepnlme.dynamics import OneCmtOral
from deepnlme.inference import Laplace, OuterOptions, fit
from deepnlme.likelihood import residual
from deepnlme.model.base import NLMEModel
from deepnlme.model.params import RandomEffects, positive
from deepnlme.model.zoo.neural import NeuralPKModel
from deepnlme.model.zoo.pk import OneCmtOralModel

INIT = {"tvka": 1.0, "tvcl": 4.0, "tvv": 40.0}
INNER = {"max_iter": 100, "gtol": 1e-6}  # as configs/method/laplace.yaml


def evaluate(model: NLMEModel, estimator, pop: Population) -> dict[str, float]:
    """Held-out metrics at fixed parameters: loglik, IPRED RMSE at η̂, PRED RMSE at η = 0."""
    metrics = diagnostics.evaluate(model, estimator, pop, "heldout").metrics()
    return {
        "loglik": metrics["loglik"],
        "loglik_per_subject": metrics["loglik"] / len(pop),
        "ipred_rmse": metrics["rmse_ipred"],
        "pred_rmse": metrics["rmse_pred"],
    }


class TrueModel(NLMEModel):
    """The data-generating model with every parameter fixed at its true value (a reference)."""

    covariates = ("WT", "AGE", "CRCL")

    def __init__(self):
        super().__init__()
        sd = TRUTH["OMEGA_SD"]
        var = [sd["ka"] ** 2, sd["cl"] ** 2, sd["v"] ** 2]
        self.omega = RandomEffects(["ka", "cl", "v"], var, fixed=True)
        self.sigma_prop = positive(TRUTH["SIGMA_PROP"], fixed=True)
        self.dynamics = OneCmtOral()

    def pre(self, p, eta, cov):
        typ = true_parameters(cov.WT, cov.AGE, cov.CRCL)
        return {k: typ[k] * torch.exp(eta[k]) for k in ("ka", "cl", "v")}

    def derived(self, p, indiv, amounts, cov):
        return residual.proportional(amounts.central / indiv.v[:, None], p.sigma_prop)


def run(
    n_subjects: int = 200,
    seed: int = 0,
    hidden: tuple[int, ...] = (8,),
    weight_decay: float = 15.0,
    eta_weight_decay: float = 100.0,
    activation: str = "tanh",
    max_iter: int = 500,
    gtol: float = 1e-3,
) -> dict[str, dict[str, float]]:
    """Fit the models and return their metrics (plus the true model's) by name.

    ``neural`` is the main-job model (configs/model/neural_pk.yaml: η inputs with the
    stronger ``eta_weight_decay`` on their weights), ``neural-cov`` the covariates-only network,
    ``neural+eta`` η inputs at the plain ``weight_decay``. A fit that raises is reported with
    ``error``.
    """
    pop = synthetic_pk(n_subjects=n_subjects, seed=seed, dtype=torch.float64)
    fit_pop, held = split_heldout(pop, 0.25, seed)
    opts = OuterOptions(max_iter=max_iter, gtol=gtol, converged_gtol=max(gtol, 1e-3))
    net = {"hidden": hidden, "weight_decay": weight_decay, "activation": activation, "seed": seed}
    models: dict[str, NLMEModel] = {
        "classical": OneCmtOralModel(error="proportional", init=INIT).double(),
        "neural": NeuralPKModel(
            COVARIATES, eta_inputs=True, eta_weight_decay=eta_weight_decay, init=INIT, **net
        ).double(),
        "neural-cov": NeuralPKModel(COVARIATES, eta_inputs=False, init=INIT, **net).double(),
        "neural+eta": NeuralPKModel(COVARIATES, eta_inputs=True, init=INIT, **net).double(),
    }
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        estimator = Laplace(model, inner=INNER)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            result = fit(estimator, fit_pop, opts)
        except (RuntimeError, ValueError) as err:  # e.g. a line search into NaN territory
            out[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        metrics = evaluate(model, estimator, held)
        metrics.update(
            fit_seconds=seconds,
            fit_cpu_seconds=cpu_seconds,
            n_iter=result.n_iter,
            n_evals=result.n_evals,
            grad_max=result.grad_max,
            fit_loglik=estimator.loglik(fit_pop),
            n_params=model.n_free_parameters(),
        )
        out[name] = metrics
    truth = TrueModel().double()
    out["true model"] = evaluate(truth, Laplace(truth, inner=INNER), held)
    out["data"] = {"n_fit": len(fit_pop), "n_heldout": len(held), "n_obs_heldout": held.n_obs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subjects", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, nargs="*", default=[8])
    parser.add_argument("--weight-decay", type=float, default=15.0)
    parser.add_argument("--eta-weight-decay", type=float, default=100.0)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--gtol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = run(
        args.n_subjects,
        args.seed,
        tuple(args.hidden),
        args.weight_decay,
        args.eta_weight_decay,
        args.activation,
        args.max_iter,
        args.gtol,
    )
    data = res.pop("data")
    print(
        f"synthetic_pk: {data['n_fit']} fit / {data['n_heldout']} held-out subjects "
        f"({data['n_obs_heldout']} held-out observations), torch threads "
        f"{torch.get_num_threads()}"
    )
    columns = [  # (title, key, format)
        ("params", "n_params", "6d"),
        ("fit s", "fit_seconds", "7.1f"),
        ("cpu s", "fit_cpu_seconds", "7.1f"),
        ("iters", "n_iter", "5d"),
        ("|grad|", "grad_max", "8.1e"),
        ("fit LL", "fit_loglik", "9.1f"),
        ("held LL", "loglik", "9.1f"),
        ("IPRED", "ipred_rmse", "7.4f"),
        ("PRED", "pred_rmse", "7.4f"),
    ]
    widths = [int(fmt.split(".")[0].rstrip("de")) for _, _, fmt in columns]
    titles = [f"{title:>{w}}" for (title, _, _), w in zip(columns, widths, strict=True)]
    print(f"{'model':<10} " + " ".join(titles))
    for name, m in res.items():
        if "error" in m:
            print(f"{name:<10} fit failed: {m['error'][:200]}")
            continue
        cells = [
            format(m[key], fmt) if key in m else " " * w
            for (_, key, fmt), w in zip(columns, widths, strict=True)
        ]
        print(f"{name:<10} " + " ".join(cells))
    print("RMSE in mg/L; held LL = held-out Laplace marginal log-likelihood (parameters fixed);")
    print("fit s = wall-clock seconds of the fit, cpu s = CPU seconds of this process")


if __name__ == "__main__":
    main()
