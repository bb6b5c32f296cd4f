"""All diagnostics of a fit in one call: tables (CSV), plots (PNG), report.md, console summary.

:func:`write_all` is what ``train.py`` and ``predict.py`` call after evaluating a model; every
number comes from the pure functions of this package.

Files written into the run directory (besides ``results.json``, ``estimates.csv``,
``ebes.csv``, ``gof.png`` of :func:`~deepnlme.diagnostics.report.write_tables`):

- ``predictions.csv``: per observation also TAD, CPRED, CWRES, CIWRES, NPD, NPDE;
- ``parameters.csv``: the parameter table (:mod:`~deepnlme.diagnostics.coeftable`);
- ``covariance.csv``, ``correlation.csv``: of the estimates (natural scale), when computed;
- ``shrinkage.csv``: ETABAR, its SE and p-value, η-shrinkage per η and ε-shrinkage;
- ``pcvpc.csv``: prediction-corrected VPC statistics;
- plots ``dv_pred.png``, ``residuals.png``, ``qq.png``, ``eta_hist.png``,
  ``eta_covariates.png``, ``individual_NN.png``, ``pcvpc.png``, ``convergence.png``;
- ``report.md`` gathering them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from deepnlme.data.population import Population
from deepnlme.diagnostics.coeftable import parameter_table
from deepnlme.diagnostics.covariance import METHODS, CovarianceStep, covariance_step
from deepnlme.diagnostics.curves import individual_curves
from deepnlme.diagnostics.evaluation import Evaluation
from deepnlme.diagnostics.npde import npde
from deepnlme.diagnostics.pcvpc import (
    pcvpc_figure,
    pcvpc_statistics,
    pcvpc_table,
    time_after_dose,
)
from deepnlme.diagnostics.plots import (
    convergence_figure,
    dv_pred_figure,
    eta_covariate_figure,
    eta_histogram_figure,
    individual_figures,
    qq_figure,
    residual_figure,
)
from deepnlme.diagnostics.report import write_results, write_tables
from deepnlme.diagnostics.residuals import (
    conditional_residuals,
    eps_shrinkage,
    eta_shrinkage,
    etabar,
)
from deepnlme.diagnostics.summary import console_summary, write_report
from deepnlme.inference.uncertainty import identifiability_warnings

log = logging.getLogger("deepnlme.diagnostics")


@dataclass
class DiagnosticOptions:
    """Settings of :func:`write_all` (config group ``diagnostics``)."""

    covariance: str = "r"  # covariance step: "r" (R⁻¹) or "sandwich" (R⁻¹SR⁻¹)
    n_sim: int = 200  # simulations per subject for NPD/NPDE and the pcVPC (0: none)
    seed: int = 1  # of those simulations
    vpc_bins: int = 8  # pcVPC bins (quantiles of the binning variable)
    vpc_x: str = "TAD"  # pcVPC binning variable: TAD (time after dose) or TIME
    stratify: str | None = None  # covariate whose values (or halves) stratify the pcVPC
    per_page: int = 12  # subjects per individual-fit page
    max_pages: int = 2  # individual-fit pages (the first per_page * max_pages subjects)
    plots: bool = True  # write the PNGs (and report.md)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any] | None) -> DiagnosticOptions:
        """Options from a plain mapping (unknown keys and bad values raise ValueError)."""
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown diagnostics options {unknown}; known: {sorted(known)}")
        try:
            options = cls(**config)
            options.n_sim, options.seed = int(options.n_sim), int(options.seed)
            options.vpc_bins, options.per_page = int(options.vpc_bins), int(options.per_page)
            options.max_pages = int(options.max_pages)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"diagnostics options: {exc}") from exc
        if options.covariance not in METHODS:
            raise ValueError(
                f"diagnostics.covariance must be one of {list(METHODS)} "
                f"(got {options.covariance!r})"
            )
        if options.vpc_x not in ("TAD", "TIME"):
            raise ValueError(f"diagnostics.vpc_x must be TAD or TIME (got {options.vpc_x!r})")
        if options.n_sim < 0 or min(options.vpc_bins, options.per_page, options.max_pages) < 1:
            raise ValueError(
                "diagnostics.n_sim must be >= 0, vpc_bins, per_page and max_pages >= 1 (got "
                f"{options.n_sim}, {options.vpc_bins}, {options.per_page}, {options.max_pages})"
            )
        return options


@dataclass
class SubjectDiagnostics:
    """Per-observation and per-subject diagnostics of one evaluation."""

    evaluation: Evaluation
    table: pd.DataFrame  # predictions with TAD, CPRED, CWRES, CIWRES, NPD, NPDE
    simulated: np.ndarray | None  # (K, n_obs) simulated DVs, or None


def subject_diagnostics(
    estimator, evaluation: Evaluation, n_sim: int, seed: int
) -> SubjectDiagnostics:
    """Residual columns of one evaluation's predictions table (see :func:`write_all`)."""
    model = estimator.model
    pop: Population = evaluation.population
    mask = pop.obs_mask.cpu()
    interaction = bool(getattr(estimator, "interaction", True))
    cond = conditional_residuals(model, pop, evaluation.eta, interaction)
    table = evaluation.prediction_table()
    flat = lambda t: t.detach().cpu()[mask].numpy()  # noqa: E731
    position = list(table.columns).index("TIME") + 1
    table.insert(position, "TAD", flat(time_after_dose(pop)))
    for name, values in (("CPRED", cond.cpred), ("CWRES", cond.cwres), ("CIWRES", cond.ciwres)):
        table.insert(list(table.columns).index("CMT"), name, flat(values))
    simulated = None
    if n_sim > 0 and pop.n_obs:
        generator = torch.Generator().manual_seed(seed)
        res = npde(model, pop, n_sim, generator)
        table.insert(list(table.columns).index("CMT"), "NPD", flat(res.npd))
        table.insert(list(table.columns).index("CMT"), "NPDE", flat(res.npde))
        simulated = res.simulated.detach().cpu()[:, mask].numpy()
    return SubjectDiagnostics(evaluation, table, simulated)


def shrinkage_table(model, evaluation: Evaluation) -> pd.DataFrame:
    """ETABAR (mean, SE, p-value) and SD-based shrinkage (%) per η, and the ε-shrinkage row."""
    table = etabar(model, evaluation.eta)
    shrink = eta_shrinkage(model, evaluation.eta)
    table["shrinkage_sd_pct"] = [100 * shrink[n] for n in table["eta"]]
    eps = eps_shrinkage(evaluation.predictions.iwres, evaluation.population.obs_mask)
    eps_row = {"eta": "eps (IWRES)", "n": evaluation.population.n_obs,
               "shrinkage_sd_pct": 100 * eps}
    return pd.concat([table, pd.DataFrame([eps_row])], ignore_index=True)


def _covariance_frames(step: CovarianceStep) -> tuple[pd.DataFrame, pd.DataFrame]:
    cov = pd.DataFrame(step.covariance.cpu().numpy(), index=step.labels, columns=step.labels)
    corr = pd.DataFrame(step.correlation.cpu().numpy(), index=step.labels, columns=step.labels)
    return cov, corr


def _covariance_summary(step: CovarianceStep) -> dict[str, Any]:
    return {
        "method": step.method,
        "status": step.status,
        "condition_number": step.condition_number,
        "eigenvalues": step.eigenvalues.cpu().tolist(),
        "labels": step.labels,
        "correlation": step.correlation.cpu().tolist(),
    }


def write_all(
    output_dir: str | Path,
    estimator,
    evaluations: Sequence[Evaluation],
    results: dict[str, Any],
    options: DiagnosticOptions | Mapping | None = None,
    se: bool = True,
    trace: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Every diagnostic of a fit (or of a checkpoint applied to data) into ``output_dir``.

    ``evaluations[0]`` is the population the parameters were fitted to (covariance step,
    shrinkage, plots); later ones (e.g. held-out subjects) get residual columns in
    ``predictions.csv``. ``se``: run the covariance step (models whose parameters are all
    θ, Ω, σ). ``trace``: :meth:`~deepnlme.training.callbacks.ParameterTrace.table`.
    Adds ``se``, ``covariance_step``, ``etabar``, ``shrinkage``, ``npde`` and
    ``diagnostics_seconds`` (wall time of this call) to ``results``,
    writes ``results.json`` and returns ``results``; logs the console summary.
    """
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(options, DiagnosticOptions):
        options = DiagnosticOptions.from_mapping(options)
    model = estimator.model
    fit = evaluations[0]
    step = None
    if se:
        if model.n_undeclared_parameters():
            log.info("no covariance step: the model has parameters besides θ, Ω and σ")
        else:
            step = covariance_step(estimator, fit.population, options.covariance)
            results["se"] = step.se_json()
            results["covariance_step"] = _covariance_summary(step)
            if not step.ok:
                log.warning("covariance step (%s) %s", step.method, step.status)
    warnings = results.setdefault("warnings", [])
    for warning in identifiability_warnings(model, step):
        log.warning(warning)
        warnings.append(warning)
    per_eval = [
        subject_diagnostics(estimator, e, options.n_sim, options.seed + i)
        for i, e in enumerate(evaluations)
    ]
    predictions = pd.concat([d.table for d in per_eval], ignore_index=True)
    write_tables(out, evaluations, model, se=results.get("se"), predictions=predictions)

    params = parameter_table(model, step)
    params.to_csv(out / "parameters.csv", index=False)
    if step is not None:
        cov, corr = _covariance_frames(step)
        cov.to_csv(out / "covariance.csv")
        corr.to_csv(out / "correlation.csv")
    shrink = shrinkage_table(model, fit) if model.n_eta else None
    if shrink is not None:
        shrink.to_csv(out / "shrinkage.csv", index=False)
        eta_rows = shrink[shrink["eta"].isin(model.eta_names)]
        results["etabar"] = {
            r.eta: {"mean": r.etabar, "se": r.se, "p_value": r.p_value}
            for r in eta_rows.itertuples()
        }
        results["shrinkage"] = {
            "eta_sd_pct": dict(zip(eta_rows["eta"], eta_rows["shrinkage_sd_pct"], strict=True)),
            "eps_sd_pct": float(shrink["shrinkage_sd_pct"].iloc[-1]),
        }
    fit_table = per_eval[0].table
    if "NPDE" in fit_table:
        results["npde"] = {
            "n_sim": options.n_sim,
            "mean": float(np.nanmean(fit_table["NPDE"])),
            "variance": float(np.nanvar(fit_table["NPDE"], ddof=1)),
        }

    figures: dict[str, list[str]] = {}
    if options.plots and fit.population.n_obs:
        figures = _write_plots(out, model, per_eval[0], shrink, options, trace)
    results["diagnostics_seconds"] = time.perf_counter() - start
    write_results(out / "results.json", results)
    summary = console_summary(results, params, step, shrink)
    log.info("\n%s", summary)
    if options.plots:
        write_report(out / "report.md", results, params, step, shrink, figures)
    return results


def _write_plots(
    out: Path,
    model,
    diag: SubjectDiagnostics,
    shrink: pd.DataFrame | None,
    options: DiagnosticOptions,
    trace: pd.DataFrame | None,
) -> dict[str, list[str]]:
    """Write the PNGs; returns ``{section: [file names]}`` for the report."""
    table, evaluation = diag.table, diag.evaluation
    pop = evaluation.population
    written: dict[str, list[str]] = {}

    def save(section: str, name: str, fig) -> None:
        if fig is not None:
            fig.savefig(out / name, dpi=80)
            written.setdefault(section, []).append(name)

    save("Goodness of fit", "dv_pred.png", dv_pred_figure(table))
    save("Residuals", "residuals.png", residual_figure(table))
    save("Residuals", "qq.png", qq_figure(table))
    if model.n_eta:
        shrink_map = (
            {} if shrink is None
            else dict(zip(shrink["eta"], shrink["shrinkage_sd_pct"] / 100, strict=True))
        )
        omega_sd = model.eta_sd().detach().cpu().tolist()
        save("Random effects", "eta_hist.png",
             eta_histogram_figure(evaluation.ebes, model.eta_names, omega_sd, shrink_map))
        covariates = pd.DataFrame(
            pop.covariates.detach().cpu().numpy(), columns=pop.covariate_names
        )
        save("Random effects", "eta_covariates.png",
             eta_covariate_figure(evaluation.ebes, model.eta_names, covariates))
    shown = min(len(pop), options.per_page * options.max_pages)
    curves = individual_curves(model, pop.subset(list(range(shown))), evaluation.eta[:shown])
    pages = individual_figures(table, curves, options.per_page, options.max_pages)
    for page, fig in enumerate(pages, start=1):
        save("Individual fits", f"individual_{page:02d}.png", fig)
    if diag.simulated is not None:
        observed = pcvpc_table(pop, evaluation.predictions.pred, options.vpc_x, options.stratify)
        stats = pcvpc_statistics(observed, diag.simulated, options.vpc_bins)
        stats.to_csv(out / "pcvpc.csv", index=False)
        x_label = "time after dose" if options.vpc_x == "TAD" else "TIME"
        save("Prediction-corrected VPC", "pcvpc.png", pcvpc_figure(observed, stats, x_label))
    if trace is not None and len(trace):
        save("Convergence", "convergence.png", convergence_figure(trace))
    return written
