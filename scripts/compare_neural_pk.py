"""Neural ODE vs deep compartment vs classical one-compartment model on the synthetic PK data.

For each data seed: the synthetic population (Michaelis–Menten elimination, single doses of
50/150/450 mg; ``deepnlme.data.synthetic``) split into fit and held-out subjects (seeded),
plus the held-out regimen (new subjects on 100 mg every 12 h, 7 doses). Every model has
proportional error and is fitted by the same estimator (FOCEI by default, as the main job) and
L-BFGS (restarted when it stops early) on the fit split in float64; then, with every parameter
fixed, evaluated on the held-out subjects and on the held-out regimen: marginal
log-likelihood (η̂ from each subject's own data), RMSE of population predictions (PRED,
η = 0) and individual predictions (IPRED).

* ``classical``: ``OneCmtOralModel(error="proportional")``, no covariates;
* ``deep_compartment``: ``NeuralPKModel`` (``configs/model/deep_compartment.yaml``);
* ``neural_ode``: ``NeuralODEPKModel`` (``configs/model/neural_pk.yaml``, the main job).

    PYTHONPATH=. python scripts/compare_neural_pk.py --seeds 0 1 2 [--n-subjects 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from deepnlme import diagnostics
from deepnlme.data.split import split_heldout
from deepnlme.data.synthetic import COVARIATES, synthetic_pk, synthetic_pk_regimen
from deepnlme.inference import LaplaceEstimator, OuterOptions, fit
from deepnlme.model.zoo.neural import NeuralPKModel
from deepnlme.model.zoo.neural_ode import NeuralODEPKModel
from deepnlme.model.zoo.pk import OneCmtOralModel

ROOT = Path(__file__).resolve().parents[1]
INIT = {"tvka": 1.0, "tvcl": 5.0, "tvv": 40.0}
SKIP = {"_target_", "covariates", "seed", "init", "fixed"}


def model_config(name: str) -> dict:
    """Constructor arguments of a model config (interpolated keys dropped)."""
    config = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    return {k: v for k, v in config.items() if k not in SKIP}


def main_job_method() -> dict:
    """The main job's own method settings (``configs/model_method/neural_pk_focei.yaml``)."""
    path = ROOT / "configs" / "model_method" / "neural_pk_focei.yaml"
    return yaml.safe_load(path.read_text())["method"]


def build(name: str, seed: int):
    if name == "classical":
        return OneCmtOralModel(error="proportional", init=INIT)
    if name == "deep_compartment":
        return NeuralPKModel(COVARIATES, seed=seed, **model_config("deep_compartment"))
    return NeuralODEPKModel(COVARIATES, seed=seed, **model_config("neural_pk"))


def run_one(
    name: str, seed: int, n_subjects: int, method: str, max_iter: int, n_regimen: int = 50
) -> dict:
    pop = synthetic_pk(n_subjects, seed=seed, dtype=torch.float64)
    fit_pop, held = split_heldout(pop, 0.25, seed)
    regimen = synthetic_pk_regimen(n_regimen, seed=seed, dtype=torch.float64)
    model = build(name, seed).double()
    hessian, interaction = {"focei": ("expected", True), "laplace": ("exact", True)}[method]
    inner = {"max_iter": 100, "gtol": 1e-6}
    if name == "neural_ode":  # the main job's own inner-search settings
        inner.update(main_job_method()["estimator"]["inner"])
    est = LaplaceEstimator(model, hessian=hessian, interaction=interaction, inner=inner)
    start = time.perf_counter()
    # L-BFGS as in train.py (stops at max |gradient| < 5e-4, converged below 1e-3), restarted
    # with a fresh history if it stops early without converging (up to 12 starts).
    n_iter = starts = 0
    while True:
        result = fit(est, fit_pop, OuterOptions(max_iter=max_iter - n_iter, gtol=5e-4))
        n_iter += max(result.n_iter, 1)
        starts += 1
        if result.converged or n_iter >= max_iter or starts >= 12:
            break
    seconds = time.perf_counter() - start
    row = {
        "seed": seed, "model": name, "method": method, "fit_seconds": round(seconds, 1),
        "n_iter": n_iter, "starts": starts, "grad_max": result.grad_max,
        "converged": result.converged,
        "fit_loglik": -result.loss, "n_subjects": n_subjects, "max_iter": max_iter,
    }
    for split, subjects in (("heldout", held), ("heldout_regimen", regimen)):
        metrics = diagnostics.evaluate(model, est, subjects, split).metrics()
        row[split] = {k: metrics[k] for k in ("loglik", "rmse_pred", "rmse_ipred")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-subjects", type=int, default=200)
    parser.add_argument("--n-regimen", type=int, default=50, help="held-out regimen subjects")
    parser.add_argument("--method", default="focei", choices=["focei", "laplace"])
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--models", nargs="+",
                        default=["classical", "deep_compartment", "neural_ode"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| seed | model | fit s | iters | max grad | fit LL | held LL | held PRED | "
          "held IPRED | regimen LL | regimen PRED | regimen IPRED |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        for name in args.models:
            row = run_one(
                name, seed, args.n_subjects, args.method, args.max_iter, args.n_regimen
            )
            h, r = row["heldout"], row["heldout_regimen"]
            print(
                f"| {seed} | {name} | {row['fit_seconds']:.0f} | {row['n_iter']} | "
                f"{row['grad_max']:.1e} | {row['fit_loglik']:.1f} | {h['loglik']:.1f} | "
                f"{h['rmse_pred']:.4f} | {h['rmse_ipred']:.4f} | {r['loglik']:.1f} | "
                f"{r['rmse_pred']:.4f} | {r['rmse_ipred']:.4f} |",
                flush=True,
            )
            if args.out is not None:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
