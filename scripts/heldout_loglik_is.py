"""Held-out log-likelihood of finished ``train.py`` runs by one rule for every method.

``results.json["heldout"]["loglik"]`` is each method's own marginal likelihood: the FOCEI or
Laplace approximation for those methods, importance sampling from the method's q(η) for
``method=vi``. To compare methods, this script reloads each run's checkpoint, rebuilds its
held-out subjects and held-out regimen from the run's data config, and estimates
log p(y_i) at the fitted parameters by importance sampling from a Student-t centred on each
subject's Laplace approximation (``deepnlme.inference.pyro.importance``), the same proposal,
draws and seed for every run. Prints one JSON line per run: the method's own value, the
importance-sampled one, its Monte Carlo SE and the smallest effective sample size.

    PYTHONPATH=. python3 scripts/heldout_loglik_is.py RUN_DIR [RUN_DIR ...] [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deepnlme.fitted import FittedModel
from deepnlme.inference.pyro.importance import importance_loglik, mode_proposal
from deepnlme.training import build


def heldout_loglik(run: Path, samples: int, df: float, seed: int) -> dict:
    """The run's held-out splits: its own log-likelihood and the importance-sampled one."""
    fitted = FittedModel.load(run / "checkpoints" / "last.ckpt")
    data = fitted.config["data"]
    _, heldout = build.load_data(data, fitted.dtype)
    splits = {"heldout": heldout, "heldout_regimen": build.load_regimen_data(data, fitted.dtype)}
    row = {"run": str(run), **fitted.names}
    for split, pop in splits.items():
        if pop is None:
            continue
        own = fitted.evaluate(pop).loglik
        pop = pop.to("cpu", dtype=fitted.dtype)
        loc, scale_tril = mode_proposal(fitted.model, pop)
        result = importance_loglik(fitted.model, pop, loc, scale_tril, samples, df, seed)
        row[split] = {
            "own": round(own, 2),
            "is": round(result.loglik, 2),
            "is_se": round(result.se, 3),
            "min_ess": round(float(result.ess.min()), 1),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="train.py run directories")
    parser.add_argument("--samples", type=int, default=2000, help="draws per subject")
    parser.add_argument("--df", type=float, default=5.0, help="Student-t degrees of freedom")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        print(json.dumps(heldout_loglik(run, args.samples, args.df, args.seed)), flush=True)


if __name__ == "__main__":
    main()
