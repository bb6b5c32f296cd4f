"""Simulate from a fitted model: ``python simulate.py ckpt_path=RUN/checkpoints/last.ckpt``.

Reloads the checkpoint (safely: plain data only; the model class only from ``deepnlme`` or from
a module named in ``trusted_modules=[mymodels]``), simulates ``n_replicates`` replicates of the
data's design (doses, observation times, covariates; η ~ N(0, Ω), DV from the residual model)
and writes into the Hydra run directory: ``simulations.csv`` (all replicates, REP 1..n),
``vpc.csv`` and ``vpc.png`` (visual predictive check) and ``results.json``. Without
``data=...`` the checkpoint's training data is used (all its subjects); an empty
``data.covariates`` means the covariates the model was trained with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from deepnlme import cli

if TYPE_CHECKING:
    import pandas as pd

    from deepnlme.data.population import Population
    from deepnlme.fitted import FittedModel

log = logging.getLogger("deepnlme.simulate")


def simulate_replicates(
    fitted: FittedModel,
    pop: Population,
    n_replicates: int,
    seed: int,
    batch_subjects: int = 20000,
) -> pd.DataFrame:
    """``n_replicates`` simulated replicates of ``pop``'s design, stacked.

    Replicates are simulated in batches: ``max(1, batch_subjects // len(pop))`` copies of the
    population stacked along the subject axis make one call of :meth:`FittedModel.simulate`
    (new η for every copy), seeded from ``seed`` and the batch number; the result is
    reproducible for the same ``seed`` and ``batch_subjects``.

    Returns:
        ``n_replicates * pop.n_obs`` rows: REP (1..n_replicates), then the columns of
        :meth:`FittedModel.simulate` (ID, TIME, DV, IPRED, CMT, ``eta_<name>``), each
        replicate's rows in the order of ``pop``'s observations.
    """
    import numpy as np
    import pandas as pd
    import torch

    if n_replicates < 1:
        raise ValueError(f"n_replicates must be >= 1 (got {n_replicates})")
    per_batch = max(1, min(n_replicates, batch_subjects // max(len(pop), 1)))
    starts = range(0, n_replicates, per_batch)
    batch_seeds = np.random.SeedSequence(seed).spawn(len(starts))
    tables = []
    for start, batch_seed in zip(starts, batch_seeds, strict=True):
        copies = min(per_batch, n_replicates - start)
        stacked = pop.subset(torch.arange(len(pop)).repeat(copies))
        table = fitted.simulate(stacked, seed=int(batch_seed.generate_state(1)[0]))
        table.insert(0, "REP", start + 1 + np.arange(len(table)) // pop.n_obs)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _options(cfg: DictConfig) -> tuple[int, int, int, dict]:
    """``(n_replicates, seed, batch_subjects, VPC options)`` of the config, checked."""
    try:
        counts = int(cfg.n_replicates), int(cfg.seed), int(cfg.batch_subjects)
        vpc = {
            "bins": int(cfg.vpc.bins),
            "quantiles": [float(q) for q in cfg.vpc.quantiles],
            "interval": float(cfg.vpc.interval),
        }
    except (ValueError, TypeError) as exc:
        raise cli.SetupError(f"simulate options: {exc}") from exc
    n_replicates, seed, batch_subjects = counts
    if n_replicates < 1 or seed < 0 or batch_subjects < 1:
        raise cli.SetupError(
            "n_replicates and batch_subjects must be >= 1 and seed >= 0 (got "
            f"{n_replicates}, {batch_subjects}, {seed})"
        )
    return n_replicates, seed, batch_subjects, vpc


def simulate(cfg: DictConfig, output_dir: Path) -> dict:
    """Simulate the replicates, write the VPC and the run's outputs; returns results.json.
    With ``regimen.amt`` or ``regimen.path``: predictions under that regimen instead."""
    if cfg.get("regimen") and (cfg.regimen.amt is not None or cfg.regimen.path):
        from deepnlme.training.regimen import regimen_run

        return regimen_run(cfg, output_dir)
    n_replicates, seed, batch_subjects, options = _options(cfg)
    from deepnlme import diagnostics
    from deepnlme.diagnostics.predictions import observation_table
    from deepnlme.training import commands

    fitted, pop, head = commands.load_run(cfg)
    if pop.n_obs == 0:
        raise cli.SetupError(f"data {head['data']!r} has no observations to simulate")
    simulations = simulate_replicates(fitted, pop, n_replicates, seed, batch_subjects)
    observed = observation_table(pop, {})
    try:
        stats = diagnostics.vpc_statistics(observed, simulations, **options)
    except ValueError as exc:
        raise cli.SetupError(f"vpc: {exc}") from exc

    output_dir.mkdir(parents=True, exist_ok=True)
    simulations.to_csv(output_dir / "simulations.csv", index=False)
    stats.to_csv(output_dir / "vpc.csv", index=False)
    diagnostics.save_vpc(
        observed, simulations, output_dir / "vpc.png", **options,
        log_y=bool(cfg.vpc.log_y), stats=stats,
    )
    results = {
        **head,
        "n_replicates": n_replicates,
        "seed": seed,
        "n_subjects": len(pop),
        "n_obs": pop.n_obs,
        "vpc_coverage": diagnostics.vpc_coverage(stats),
    }
    diagnostics.write_results(output_dir / "results.json", results)
    log.info(
        "%d replicates of %d subjects, VPC coverage %.2f  -> %s",
        n_replicates, len(pop), results["vpc_coverage"], output_dir,
    )
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="simulate")
def main(cfg: DictConfig) -> None:
    cli.run_command(simulate, cfg)


if __name__ == "__main__":
    main()
