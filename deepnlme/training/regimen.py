"""``simulate.py ... regimen.amt=300 regimen.ii=12 regimen.addl=9``: a fitted model's
predictions under a new dosing regimen (command-line step; the math lives in
:mod:`deepnlme.data.regimen` and :mod:`deepnlme.diagnostics.regimen`).

Writes ``regimen.csv`` (ID, TIME, CMT, PRED, IPRED, P_LO, P_MEDIAN, P_HI), ``regimen.png``
and ``results.json`` into the run directory. Subjects: the checkpoint's training data (or
``data=...``), IPRED at each subject's η̂ from its own data; or, with ``regimen.covariates``,
one new subject (ID ``new``) with those covariates (no IPRED).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from deepnlme import diagnostics
from deepnlme.data.regimen import (
    RegimenError,
    prediction_times,
    read_dosing_table,
    regimen_from_options,
    regimen_population,
)
from deepnlme.diagnostics.regimen import regimen_predictions, save_regimen_plot
from deepnlme.training import build, commands

log = logging.getLogger("deepnlme.simulate")


def _doses(options: dict):
    if options.get("path"):
        return read_dosing_table(options["path"])
    return regimen_from_options(options).frame()


def regimen_run(cfg: DictConfig, output_dir: Path) -> dict:
    """Predictions under ``cfg.regimen`` written to ``output_dir``; returns results.json."""
    options = build.plain(cfg.regimen)
    try:
        doses = _doses(options)
        n_times = int(options.get("n_times") or 97)
        t_end = options.get("t_end")
        times = prediction_times(doses, n_times, None if t_end is None else float(t_end))
        interval = float(options.get("interval", 0.9))
        if not 0.0 < interval < 1.0:
            raise RegimenError(f"regimen.interval must be in (0, 1), got {interval}")
    except RegimenError as exc:
        raise build.SetupError(str(exc)) from exc
    n_replicates, seed = int(cfg.n_replicates), int(cfg.seed)
    batch_subjects = int(cfg.batch_subjects)
    if n_replicates < 1 or seed < 0 or batch_subjects < 1:
        raise build.SetupError(
            "n_replicates and batch_subjects must be >= 1 and seed >= 0 (got "
            f"{n_replicates}, {batch_subjects}, {seed})"
        )
    fitted, pop, head = commands.load_run(cfg)
    names = fitted.covariate_names
    given = options.get("covariates")
    if given:
        missing = [c for c in names if c not in given]
        if missing:
            raise build.SetupError(
                f"regimen.covariates needs a value for every covariate of the model {names} "
                f"(missing {missing})"
            )
        ids, covariates, eta_hat = ["new"], np.array([[float(given[c]) for c in names]]), None
    else:
        if "ID" in doses.columns:
            keep = [i for i, subject in enumerate(pop.ids) if subject in set(doses["ID"])]
            if not keep:
                raise build.SetupError("the dosing table's IDs match no subject of the data")
            pop = pop.subset(keep)
        columns = [pop.covariate(name).double().cpu().numpy() for name in names]
        ids, covariates = list(pop.ids), np.stack(columns, axis=-1).reshape(len(pop), len(names))
        eta_hat = fitted.evaluate(pop).eta
    try:
        design = regimen_population(ids, covariates, names, doses, times, dtype=fitted.dtype)
    except RegimenError as exc:
        raise build.SetupError(str(exc)) from exc
    build.check_data(fitted.model, design)
    table = regimen_predictions(
        fitted.model, design, eta_hat, n_replicates, seed, interval, batch_subjects
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_dir / "regimen.csv", index=False)
    save_regimen_plot(table, output_dir / "regimen.png")
    results = {
        **head,
        "regimen": {k: v for k, v in options.items() if v is not None},
        "n_replicates": n_replicates,
        "seed": seed,
        "n_subjects": len(ids),
        "n_times": len(times),
        "interval": interval,
    }
    diagnostics.write_results(output_dir / "results.json", results)
    log.info("regimen predictions for %d subject(s) -> %s", len(ids), output_dir)
    return results
