"""Benchmark: InstEval formula-model fits against lme4 (and ordinal::clmm) in the same run.

Fits ``y ~ service + (1|s) + (1|d) + (1|dept)`` on lme4's InstEval (73,421 rows) with
deepnlme (Gaussian ML by the profiled deviance; with ``--ordinal`` also the cumulative-logit
model by Laplace) and, when ``Rscript`` with lme4 is installed, with ``lmer(..., REML = FALSE)``
(``--clmm``: also ``ordinal::clmm``, which takes about 12 minutes). Each side's time covers
building the model from the table and fitting it (ours also computes conditional modes and
variances; lme4's ``lmer`` call likewise). Prints wall and CPU seconds, log-likelihoods and the
time ratios ours/R. Usage::

    python scripts/benchmark_mixed.py [--repeats 2] [--ordinal] [--clmm] [--threads 1]

``--vi``: instead, ``train.py`` runs on 80% of the rows (``data.heldout_fraction=0.2``): the
ML fit, then ``method=vi`` full batch and in minibatches of ``--batch-rows`` rows (with the
guide's low-rank part of ``--rank`` columns, and without it); prints each run's wall and CPU
seconds, log-likelihood at its estimates, ELBO, variances relative to the ML fit's and
held-out RMSE::

    python scripts/benchmark_mixed.py --vi [--steps 2000] [--batch-rows 4096] [--rank 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from deepnlme.mixed.datasets import table_path
from deepnlme.mixed.design import build_design
from deepnlme.mixed.formula import parse_formula
from deepnlme.mixed.glmm import fit_glmm
from deepnlme.mixed.lmm import fit_lmm

FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"
R_SCRIPT = r"""
suppressMessages({library(lme4)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
for (v in c("s", "d", "dept")) d[[v]] <- factor(d[[v]])
res <- list()
for (i in seq_len(as.integer(args[2]))) {
  t <- system.time(m <- lmer(y ~ service + (1|s) + (1|d) + (1|dept), d, REML = FALSE))
  res$lmer <- list(wall = t[["elapsed"]], cpu = t[["user.self"]] + t[["sys.self"]],
                   loglik = as.numeric(logLik(m)))
}
if (args[3] == "1") {
  suppressMessages({library(ordinal)})
  d$yf <- factor(d$y, ordered = TRUE)
  t <- system.time(m <- clmm(yf ~ service + (1|s) + (1|d) + (1|dept), data = d))
  res$clmm <- list(wall = t[["elapsed"]], cpu = t[["user.self"]] + t[["sys.self"]],
                   loglik = as.numeric(logLik(m)))
}
cat(sprintf('{"lmer": {"wall": %f, "cpu": %f, "loglik": %f}%s}\n', res$lmer$wall,
    res$lmer$cpu, res$lmer$loglik, if (is.null(res$clmm)) "" else sprintf(
    ', "clmm": {"wall": %f, "cpu": %f, "loglik": %f}', res$clmm$wall, res$clmm$cpu,
    res$clmm$loglik)))
"""


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def ours(table: pd.DataFrame, family: str, device: str):
    def run():
        design = build_design(table, parse_formula(FORMULA), "insteval").to(device)
        if family == "gaussian":
            return fit_lmm(design)
        return fit_glmm(design, "ordinal", "logit", se=False)

    fit, wall, cpu = timed(run)
    return {"wall": wall, "cpu": cpu, "loglik": fit.loglik, "converged": fit.converged}


def lme4(repeats: int, clmm: bool) -> dict | None:
    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        script, csv = Path(tmp) / "bench.R", Path(tmp) / "insteval.csv"
        script.write_text(R_SCRIPT)
        pd.read_csv(table_path("insteval")).to_csv(csv, index=False)
        proc = subprocess.run(
            ["Rscript", str(script), str(csv), str(repeats), "1" if clmm else "0"],
            capture_output=True, text=True,
        )
    if proc.returncode != 0:
        print("R failed:", proc.stderr.strip().splitlines()[-1:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_run(out: Path, *overrides: str) -> dict:
    """``train.py model=mixed data=insteval data.heldout_fraction=0.2 ...`` into ``out``:
    its results.json with the process's wall and CPU seconds."""
    import resource
    import sys

    root = Path(__file__).resolve().parents[1]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(root / "train.py"), "model=mixed", "data=insteval",
         "data.heldout_fraction=0.2", "trainer.enable_progress_bar=false", *overrides,
         f"hydra.run.dir={out}"], cwd=root, capture_output=True, text=True,
    )
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**results, "wall": wall, "cpu": cpu}


def compare_vi(steps: int, batch_rows: int, rank: int) -> None:
    """ML against VI on the same 80% of InstEval's rows (see the module's docstring)."""
    runs = {
        "ml": ["method=ml"],
        f"vi full rank {rank}": ["method=vi", f"method.mixed.steps={steps}",
                                 f"method.mixed.rank={rank}"],
        f"vi {batch_rows} rows rank {rank}": [
            "method=vi", f"method.mixed.steps={steps}", f"method.mixed.rank={rank}",
            f"data.batch_rows={batch_rows}"],
        "vi full rank 0": ["method=vi", f"method.mixed.steps={steps}", "method.mixed.rank=0"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: train_run(Path(tmp) / str(i), *o)
                   for i, (name, o) in enumerate(runs.items())}
    ml = results["ml"]
    groups = ("s", "d", "dept", "Residual")
    print(f"{'fit':24s} {'wall s':>7s} {'cpu s':>7s} {'loglik':>12s} {'elbo':>12s} "
          + " ".join(f"{'var ' + g:>17s}" for g in groups) + f" {'service':>9s} {'RMSE':>9s}")
    for name, r in results.items():
        var = [r["varcorr"][g]["var"][0] for g in groups]
        rel = [v / ml["varcorr"][g]["var"][0] - 1 for v, g in zip(var, groups, strict=True)]
        cells = " ".join(f"{v:9.5f}{'' if name == 'ml' else f' ({d:+.0%})':>8s}"
                         for v, d in zip(var, rel, strict=True))
        print(f"{name:24s} {r['wall']:7.1f} {r['cpu']:7.1f} {r['loglik']:12.2f} "
              f"{r.get('elbo', float('nan')):12.2f} {cells} {r['fixef']['service']:9.5f} "
              f"{r['heldout']['rmse']:9.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="fits per side (best is kept)")
    parser.add_argument("--ordinal", action="store_true", help="also the ordinal Laplace fit")
    parser.add_argument("--clmm", action="store_true", help="also ordinal::clmm (slow)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vi", action="store_true", help="ML against VI through train.py")
    parser.add_argument("--steps", type=int, default=2000, help="VI optimizer steps")
    parser.add_argument("--batch-rows", type=int, default=4096, help="VI minibatch rows")
    parser.add_argument("--rank", type=int, default=20, help="VI guide's low-rank columns")
    args = parser.parse_args()
    if args.vi:
        compare_vi(args.steps, args.batch_rows, args.rank)
        return
    torch.set_num_threads(args.threads)
    table = pd.read_csv(table_path("insteval"))
    rows = {}
    runs = [ours(table, "gaussian", args.device) for _ in range(args.repeats)]
    rows["deepnlme LMM (ML)"] = min(runs, key=lambda r: r["wall"])
    r = lme4(args.repeats, args.clmm)
    if r is not None:
        rows["lme4::lmer (ML)"] = r["lmer"]
        if "clmm" in r:
            rows["ordinal::clmm"] = r["clmm"]
    if args.ordinal:
        rows["deepnlme ordinal (Laplace)"] = ours(table, "ordinal", args.device)
    print(f"{'fit':28s} {'wall s':>8s} {'cpu s':>8s} {'loglik':>14s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['wall']:8.2f} {r['cpu']:8.2f} {r['loglik']:14.4f}")
    if "lme4::lmer (ML)" in rows:
        a, b = rows["deepnlme LMM (ML)"], rows["lme4::lmer (ML)"]
        print(f"ratio ours/lme4: wall {a['wall'] / b['wall']:.3f}, cpu {a['cpu'] / b['cpu']:.3f}")
    if "ordinal::clmm" in rows and args.ordinal:
        a, b = rows["deepnlme ordinal (Laplace)"], rows["ordinal::clmm"]
        print(f"ratio ours/clmm: wall {a['wall'] / b['wall']:.3f}, cpu {a['cpu'] / b['cpu']:.3f}")


if __name__ == "__main__":
    main()
