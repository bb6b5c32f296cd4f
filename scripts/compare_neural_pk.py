"""Neural (deep compartment) vs classical one-compartment model on the synthetic PK data.

Fits both models by Laplace + L-BFGS in float64 on the fit split (75% of subjects, seeded)
and evaluates on the held-out subjects with the parameters fixed: marginal log-likelihood
(η̂ from each held-out subject's own data), RMSE of individual predictions at η̂ (IPRED) and
of population predictions at η = 0 (PRED). The same metrics of the true data-generating model
(every parameter at its true value) are printed as the reference.

    python scripts/compare_neural_pk.py [--n-subjects 200] [--hidden 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

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


def rmse(pred: torch.Tensor, pop: Population) -> float:
    """Root mean squared error of ``pred`` ``(N, T)`` against DV over real observations."""
    r = (pred - pop.obs_dv)[pop.obs_mask]
    return float(torch.sqrt((r * r).mean()))


def evaluate(model: NLMEModel, estimator, pop: Population) -> dict[str, float]:
    """Held-out metrics at fixed parameters: loglik, IPRED RMSE at η̂, PRED RMSE at η = 0."""
    loglik = estimator.loglik(pop, warm_start=False)
    eta_hat = estimator.modes(pop)
    with torch.no_grad():
        ipred = model.observe(eta_hat, pop).prediction
        pred = model.observe(torch.zeros_like(eta_hat), pop).prediction
    return {
        "loglik": loglik,
        "loglik_per_subject": loglik / len(pop),
        "ipred_rmse": rmse(ipred, pop),
        "pred_rmse": rmse(pred, pop),
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
    activation: str = "tanh",
    eta_inputs: bool = True,
    max_iter: int = 300,
    gtol: float = 1e-3,
) -> dict[str, dict[str, float]]:
    """Fit both models and return their metrics (plus the true model's) by name."""
    pop = synthetic_pk(n_subjects=n_subjects, seed=seed, dtype=torch.float64)
    fit_pop, held = split_heldout(pop, 0.25, seed)
    opts = OuterOptions(max_iter=max_iter, gtol=gtol, converged_gtol=max(gtol, 1e-3))
    models: dict[str, NLMEModel] = {
        "classical": OneCmtOralModel(error="proportional", init=INIT).double(),
        "neural": NeuralPKModel(
            COVARIATES,
            hidden=hidden,
            weight_decay=weight_decay,
            activation=activation,
            eta_inputs=eta_inputs,
            seed=seed,
            init=INIT,
        ).double(),
    }
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        estimator = Laplace(model)
        start = time.perf_counter()
        result = fit(estimator, fit_pop, opts)
        seconds = time.perf_counter() - start
        metrics = evaluate(model, estimator, held)
        metrics.update(
            fit_seconds=seconds,
            n_iter=result.n_iter,
            n_evals=result.n_evals,
            grad_max=result.grad_max,
            fit_loglik=estimator.loglik(fit_pop),
            n_params=model.n_free_parameters(),
        )
        out[name] = metrics
    truth = TrueModel().double()
    out["true model"] = evaluate(truth, Laplace(truth), held)
    out["data"] = {"n_fit": len(fit_pop), "n_heldout": len(held), "n_obs_heldout": held.n_obs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subjects", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, nargs="*", default=[8])
    parser.add_argument("--weight-decay", type=float, default=15.0)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--eta-inputs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--gtol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = run(
        args.n_subjects,
        args.seed,
        tuple(args.hidden),
        args.weight_decay,
        args.activation,
        args.eta_inputs,
        args.max_iter,
        args.gtol,
    )
    data = res.pop("data")
    print(
        f"synthetic_pk: {data['n_fit']} fit / {data['n_heldout']} held-out subjects "
        f"({data['n_obs_heldout']} held-out observations), torch threads "
        f"{torch.get_num_threads()}"
    )
    header = (
        f"{'model':<10} {'params':>6} {'fit s':>7} {'iters':>5} {'|grad|':>8} {'fit LL':>9} "
        f"{'held LL':>9} {'IPRED':>7} {'PRED':>7}"
    )
    print(header)
    for name, m in res.items():
        if name == "true model":
            print(
                f"{name:<10} {'':>6} {'':>7} {'':>5} {'':>8} {'':>9} {m['loglik']:>9.1f} "
                f"{m['ipred_rmse']:>7.4f} {m['pred_rmse']:>7.4f}"
            )
            continue
        print(
            f"{name:<10} {m['n_params']:>6d} {m['fit_seconds']:>7.1f} {m['n_iter']:>5d} "
            f"{m['grad_max']:>8.1e} {m['fit_loglik']:>9.1f} {m['loglik']:>9.1f} "
            f"{m['ipred_rmse']:>7.4f} {m['pred_rmse']:>7.4f}"
        )
    print("RMSE in mg/L; held LL = held-out Laplace marginal log-likelihood (parameters fixed)")


if __name__ == "__main__":
    main()
