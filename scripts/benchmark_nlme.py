"""Benchmark: Laplace fit of Theophylline-like populations against R nlme on the same data.

Simulates populations (10 observations per subject, one oral dose, the Theophylline model
with additive error at the reference estimates), fits them with deepnlme (Laplace, float64)
and, when ``Rscript`` with nlme is installed, with R nlme in the same run::

    nlme(conc ~ f(Dose, Time, lKa, lCl, lV), fixed = lKa + lCl + lV ~ 1,
         random = pdDiag(lKa + lCl + lV ~ 1))

Prints fit time and estimates of both, and the time ratio. Usage::

    python scripts/benchmark_nlme.py --sizes 1000 5000 [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deepnlme.data import load_population
from deepnlme.data.synthetic import one_cmt_oral_conc
from deepnlme.inference import Laplace, OuterOptions, fit
from deepnlme.model.zoo.pk import OneCmtOralModel

TRUE = {
    "ka": 1.5789,
    "cl": 0.04004,
    "v": 0.4575,
    "omega_sd": (0.6526, 0.2652, 0.1339),
    "sigma": 0.6912,
}
TIMES = np.array([0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 12.0, 24.0])
START = {"ka": 1.0, "cl": 0.05, "v": 0.5}

R_SCRIPT = r"""
suppressMessages(library(nlme))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], na.strings = ".")
d <- d[d$EVID == 0, ]
d$conc <- d$DV
d$Time <- d$TIME
d$Subject <- factor(d$ID)
f <- function(Dose, Time, lKa, lCl, lV) {
  ka <- exp(lKa); k <- exp(lCl - lV)
  Dose * ka / (exp(lV) * (ka - k)) * (exp(-k * Time) - exp(-ka * Time))
}
g <- groupedData(conc ~ Time | Subject, data = d)
st <- system.time(m <- nlme(conc ~ f(Dose, Time, lKa, lCl, lV), data = g,
  fixed = lKa + lCl + lV ~ 1, random = pdDiag(lKa + lCl + lV ~ 1),
  start = c(lKa = log(%(ka)s), lCl = log(%(cl)s), lV = log(%(v)s))))
re <- as.numeric(VarCorr(m)[1:3, "StdDev"])
cat(sprintf(paste0('{"seconds": %%.4f, "loglik": %%.6f, "ka": %%.6g, "cl": %%.6g, "v": %%.6g, ',
  '"omega_sd": [%%.6g, %%.6g, %%.6g], "sigma": %%.6g}\n'),
  st[["elapsed"]], as.numeric(logLik(m)), exp(fixef(m)[["lKa"]]), exp(fixef(m)[["lCl"]]),
  exp(fixef(m)[["lV"]]), re[1], re[2], re[3], m$sigma))
"""


def simulate(n_subjects: int, seed: int) -> pd.DataFrame:
    """NONMEM-style table: per subject one dose (mg/kg) at 0 into depot and 10 concentrations."""
    rng = np.random.default_rng(seed)
    eta = rng.normal(size=(n_subjects, 3)) * np.array(TRUE["omega_sd"])
    ka, cl, v = (TRUE[k] * np.exp(eta[:, j]) for j, k in enumerate(("ka", "cl", "v")))
    dose = rng.uniform(3.0, 6.0, n_subjects).round(2)
    conc = one_cmt_oral_conc(TIMES[None, :], dose[:, None], ka, cl, v)
    conc = conc + TRUE["sigma"] * rng.normal(size=conc.shape)
    ids = np.arange(1, n_subjects + 1)
    doses = pd.DataFrame(
        {
            "ID": ids,
            "TIME": 0.0,
            "AMT": dose,
            "DV": np.nan,
            "EVID": 1,
            "MDV": 1,
            "CMT": 1,
            "Dose": dose,
        }
    )
    obs = pd.DataFrame(
        {
            "ID": np.repeat(ids, len(TIMES)),
            "TIME": np.tile(TIMES, n_subjects),
            "AMT": 0.0,
            "DV": conc.ravel().round(4),
            "EVID": 0,
            "MDV": 0,
            "CMT": 2,
            "Dose": np.repeat(dose, len(TIMES)),
        }
    )
    return pd.concat([doses, obs]).sort_values(
        ["ID", "TIME", "EVID"], ascending=[True, True, False]
    )


def fit_deepnlme(csv: Path, device: str) -> dict:
    pop = load_population(csv, dtype=torch.float64).to(device)
    model = OneCmtOralModel(
        error="additive", init={**{f"tv{k}": v for k, v in START.items()}, "omega": [0.1] * 3}
    ).to(device=device, dtype=torch.float64)
    est = Laplace(model)
    result = fit(est, pop, OuterOptions())
    p = {name: value.detach() for name, value in model.param_values().items()}
    return {
        "seconds": result.seconds,
        "loglik": est.loglik(pop),
        "converged": result.converged,
        "ka": float(p["tvka"]),
        "cl": float(p["tvcl"]),
        "v": float(p["tvv"]),
        "omega_sd": torch.diagonal(p["omega"]).sqrt().tolist(),
        "sigma": float(p["sigma_add"]),
    }


def fit_nlme(csv: Path) -> dict | None:
    if shutil.which("Rscript") is None:
        return None
    script = csv.with_suffix(".R")
    script.write_text(R_SCRIPT % START)
    out = subprocess.run(["Rscript", str(script), str(csv)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "nlme failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(r: dict) -> str:
    sd = ", ".join(f"{s:.4f}" for s in r["omega_sd"])
    return (
        f"{r['seconds']:8.2f} s  loglik {r['loglik']:12.3f}  ka {r['ka']:.4f} cl {r['cl']:.5f} "
        f"v {r['v']:.4f}  omega_sd [{sd}]  sigma {r['sigma']:.4f}"
    )


def max_relative_gap(a: dict, b: dict) -> float:
    """Largest |a - b| / |b| over ka, cl, v, the three ω SDs and σ."""
    pairs = [(a[k], b[k]) for k in ("ka", "cl", "v", "sigma")]
    pairs += list(zip(a["omega_sd"], b["omega_sd"], strict=True))
    return max(abs(x - y) / abs(y) for x, y in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: all cores)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            csv = Path(tmp) / f"theo_like_{n}.csv"
            simulate(n, args.seed).to_csv(csv, index=False, na_rep=".")
            ours = fit_deepnlme(csv, args.device)
            theirs = fit_nlme(csv)
            print(f"N = {n} subjects, {10 * n} observations")
            print(f"  deepnlme (Laplace): {fmt(ours)}  converged={ours['converged']}")
            if theirs is None:
                print("  R nlme: not installed (apt-get install r-base-core r-cran-nlme)")
            elif "error" in theirs:
                print(f"  R nlme: failed: {theirs['error']}")
            else:
                print(f"  R nlme (linearization): {fmt(theirs)}")
                ratio = theirs["seconds"] / ours["seconds"]
                print(f"  nlme time / deepnlme time = {ratio:.2f}")
                gap = max_relative_gap(ours, theirs)
                print(f"  largest relative difference of the estimates: {gap:.2%}")


if __name__ == "__main__":
    main()
