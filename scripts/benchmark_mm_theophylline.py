"""Benchmark: the two-compartment Michaelis–Menten ODE model on Theophylline, and R for scale.

In one run, one after the other:

1. ``model=two_cmt_mm_oral`` (``deepnlme.model.zoo.ode_pk.TwoCmtMMOralModel``, additive
   error, dopri5 at the config's rtol 1e-6 / atol 1e-8) fitted by Laplace (L-BFGS to
   convergence, as ``train.py model=two_cmt_mm_oral data=theophylline method=laplace``);
2. the closed-form two-compartment oral model (``model=two_cmt_oral``, additive error, η on
   ka, cl, v, q, vp) by Laplace, for scale, from the Michaelis–Menten model's starting values
   (cl = vmax / km);
3. when ``Rscript`` with nlme and deSolve is installed (``apt-get install r-base-core
   r-cran-nlme r-cran-desolve``): the same Michaelis–Menten model by R's ``nlme``
   (Lindstrom–Bates linearization), each subject's ODE solved by ``deSolve::lsoda`` at the
   same tolerances, from the same starting values.

Prints fit seconds (wall and this process's CPU), evaluations, log-likelihood, convergence
and estimates of each::

    PYTHONPATH=. python scripts/benchmark_mm_theophylline.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from deepnlme.data import load_dataset
from deepnlme.data.datasets import __file__ as datasets_init
from deepnlme.inference import Laplace, fit
from deepnlme.model.zoo.ode_pk import TwoCmtMMOralModel
from deepnlme.model.zoo.pk import TwoCmtOralModel

THEOPHYLLINE_CSV = Path(datasets_init).parent / "theophylline.csv"
MM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "two_cmt_mm_oral.yaml"


def mm_model() -> TwoCmtMMOralModel:
    """The Michaelis–Menten model with the solver settings of ``model=two_cmt_mm_oral``."""
    solver = OmegaConf.to_container(OmegaConf.load(MM_CONFIG).solver)
    return TwoCmtMMOralModel(solver=solver)

#: The Michaelis–Menten model for nlme: fixed effects on the log scale, η on ka, vmax, v
#: (pdDiag), additive error; starting values are TwoCmtMMOralModel's defaults.
R_SCRIPT = r"""
suppressMessages({library(nlme); library(deSolve)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], na.strings = ".")
dose <- d[d$EVID == 1, c("ID", "AMT")]
obs <- d[d$EVID == 0, ]
obs$Dose <- dose$AMT[match(obs$ID, dose$ID)]
obs$Subject <- factor(obs$ID, levels = unique(obs$ID))
rhs <- function(t, a, p) {
  conc <- a[2] / p[4]
  absorption <- p[1] * a[1]
  elimination <- p[2] * conc / (p[3] + conc)
  distribution <- p[5] * (conc - a[3] / p[6])
  list(c(-absorption, absorption - elimination - distribution, distribution))
}
f <- function(Subject, Dose, Time, lKa, lVmax, lKm, lV, lQ, lVp) {
  out <- numeric(length(Time))
  for (s in unique(Subject)) {
    i <- which(Subject == s); j <- i[1]
    p <- exp(c(lKa[j], lVmax[j], lKm[j], lV[j], lQ[j], lVp[j]))
    tt <- sort(unique(c(0, Time[i])))
    sol <- lsoda(c(Dose[j], 0, 0), tt, rhs, p, rtol = 1e-6, atol = 1e-8)
    out[i] <- sol[match(Time[i], sol[, 1]), 3] / p[4]
  }
  out
}
g <- groupedData(DV ~ TIME | Subject, data = obs)
start <- c(lKa = log(%(ka)s), lVmax = log(%(vmax)s), lKm = log(%(km)s), lV = log(%(v)s),
           lQ = log(%(q)s), lVp = log(%(vp)s))
st <- system.time(m <- try(nlme(DV ~ f(Subject, Dose, TIME, lKa, lVmax, lKm, lV, lQ, lVp),
  data = g, fixed = lKa + lVmax + lKm + lV + lQ + lVp ~ 1,
  random = pdDiag(lKa + lVmax + lV ~ 1), start = start), silent = TRUE))
if (inherits(m, "try-error")) {
  msg <- gsub('["\n]', " ", trimws(as.character(m)))
  cat(sprintf('{"seconds": %%.3f, "error": "%%s"}\n', st[["elapsed"]], msg))
} else {
  fe <- exp(fixef(m)); re <- as.numeric(VarCorr(m)[1:3, "StdDev"])
  cat(sprintf(paste0('{"seconds": %%.3f, "loglik": %%.6f, "tvka": %%.6g, "tvvmax": %%.6g, ',
    '"tvkm": %%.6g, "tvv": %%.6g, "tvq": %%.6g, "tvvp": %%.6g, "omega_sd": [%%.6g, %%.6g, ',
    '%%.6g], "sigma": %%.6g}\n'), st[["elapsed"]], as.numeric(logLik(m)), fe[1], fe[2], fe[3],
    fe[4], fe[5], fe[6], re[1], re[2], re[3], m$sigma))
}
"""


def fit_ours(model) -> dict:
    """Laplace fit (L-BFGS, train.py's defaults) on Theophylline: seconds, result, estimates."""
    pop = load_dataset("theophylline")
    est = Laplace(model)
    cpu = time.process_time()
    result = fit(est, pop)
    cpu = time.process_time() - cpu
    estimates = {
        name: [round(float(x), 6) for x in value.detach().flatten() if float(x) != 0.0]
        for name, value in model.param_values().items()
    }
    return {
        "seconds": round(result.seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "evaluations": result.n_evals,
        "iterations": result.n_iter,
        "loglik": round(est.loglik(pop), 4),
        "converged": result.converged,
        "grad_max": float(f"{result.grad_max:.3g}"),
        "stop_reason": result.stop_reason,
        "warnings": result.warnings,
        "estimates": estimates,
    }


def mm_start() -> dict[str, float]:
    """TwoCmtMMOralModel's starting typical values by name without ``tv`` (ka, vmax, km, ...)."""
    values = TwoCmtMMOralModel().param_values()
    return {
        k.removeprefix("tv"): float(v.detach()) for k, v in values.items() if k.startswith("tv")
    }


def linear_start() -> dict[str, float]:
    """The same start for the linear model: clearance vmax / km (the low-concentration limit)."""
    s = mm_start()
    return {"tvka": s["ka"], "tvcl": s["vmax"] / s["km"], "tvv": s["v"], "tvq": s["q"],
            "tvvp": s["vp"]}


def fit_nlme() -> dict | str:
    """R nlme + deSolve on the Michaelis–Menten model, or why it did not run."""
    if shutil.which("Rscript") is None:
        return "Rscript not installed"
    start = mm_start()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "mm.R"
        script.write_text(R_SCRIPT % start)
        out = subprocess.run(["Rscript", str(script), str(THEOPHYLLINE_CSV)],
                             capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return f"R failed: {lines[-1] if lines else out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-r", action="store_true", help="do not run R")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # its first use imports modules
    rows = {
        "deepnlme Laplace, two_cmt_mm_oral (ODE, dopri5)": fit_ours(mm_model()),
        "deepnlme Laplace, two_cmt_oral (closed form)": fit_ours(
            TwoCmtOralModel(error="additive", init=linear_start())
        ),
    }
    if not args.skip_r:
        rows["R nlme + deSolve::lsoda, two_cmt_mm_oral"] = fit_nlme()
    for name, row in rows.items():
        print(f"{name}:\n  {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
