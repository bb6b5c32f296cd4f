"""Fit an NLME model: ``python train.py [model=...] [data=...] [method=...] [key=value ...]``.

Writes into the Hydra run directory: ``results.json``, ``estimates.csv``, ``predictions.csv``,
``ebes.csv``, ``gof.png`` and ``checkpoints/last.ckpt`` (rewritten every epoch; SIGINT/SIGTERM
stop the fit after the current epoch, exit status 128 + signal). ``ckpt_path=RUN/checkpoints/
last.ckpt`` resumes an interrupted fit. ``main`` returns ``results[optimized_metric]`` (default
the OFV) to sweepers such as Optuna. Bad data or a model that does not fit the data: one line
on stderr and exit status 1.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from deepnlme import cli

if TYPE_CHECKING:
    from deepnlme.training.module import NLMEFitModule

log = logging.getLogger("deepnlme.train")


def train(cfg: DictConfig, output_dir: Path) -> dict:
    """Fit, evaluate and write the run's outputs to ``output_dir``; returns results.json.

    Start-up order: a CSV table is read and checked first (pandas only, before torch loads),
    then the tensors are built from it (torch and the data layer); the models, Lightning and
    the diagnostics load after them, so a data error answers quickly.
    """
    if cfg.get("model") is not None and cfg.model.get("formula"):  # lme4-style mixed model
        from deepnlme.training.mixed import train_mixed

        return train_mixed(cfg, output_dir)

    from deepnlme.training.data_source import read_data

    table = read_data(cfg.data)  # a CSV table is read and checked before torch loads

    from deepnlme.training import build

    build.set_threads(cfg)
    dtype = build.precision_dtype(cfg.trainer.precision)
    fit_pop, heldout_pop = build.load_data(cfg.data, dtype, table)
    regimen_pop = build.load_regimen_data(cfg.data, dtype)
    options = build.diagnostic_options(cfg)
    checkpoint = _resume_checkpoint(cfg.ckpt_path)

    import lightning.pytorch as pl

    from deepnlme import diagnostics
    from deepnlme.fitted import checkpoint_metadata
    from deepnlme.training.stochastic import STOCHASTIC

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, model_args = build.build_model(cfg.model, dtype)
    build.check_data(model, fit_pop)
    estimator = build.build_estimator(cfg.method, model)
    names = build.run_names(cfg, model, estimator)
    config = {**build.plain(cfg), "model": model_args}
    metadata = checkpoint_metadata(config, fit_pop.covariate_names, dtype, names)
    stochastic = getattr(estimator, "fit_style", None) in STOCHASTIC
    if stochastic:
        summary, trace = _fit_stochastic(cfg, estimator, fit_pop, dtype, output_dir, metadata)
        if summary is None:  # data-parallel fit: rank 0 reports
            return {}
    else:
        summary, trace = _fit_full_batch(
            cfg, estimator, fit_pop, dtype, output_dir, metadata, checkpoint
        )

    model.cpu()
    evaluations = [diagnostics.evaluate(model, estimator, fit_pop, "fit")]
    if heldout_pop is not None:
        evaluations.append(diagnostics.evaluate(model, estimator, heldout_pop, "heldout"))
    if regimen_pop is not None:
        build.check_data(model, regimen_pop)
        evaluations.append(
            diagnostics.evaluate(model, estimator, regimen_pop, "heldout_regimen")
        )
    warnings = summary.pop("warnings", [])
    integration = diagnostics.integration_error(model, evaluations)
    for warning in diagnostics.integration_warnings(integration):
        log.warning(warning)
        warnings.append(warning)
    results = {
        **names,
        **diagnostics.likelihood_summary(model, evaluations[0]),
        **summary,
        **diagnostics.parameter_summary(model),
        "warnings": warnings,
    }
    if hasattr(estimator, "elbo_value"):
        results["elbo"] = estimator.elbo_value(fit_pop)
    for evaluation in evaluations[1:]:
        results[evaluation.split] = evaluation.metrics()
    if integration is not None:
        results["integration_error"] = integration
    if cfg.get("loglik_is", True):
        from deepnlme.inference.pyro.importance import importance_summary

        results.update(importance_summary(model, estimator, evaluations[0], cfg))
    # the covariance step differentiates the objective: not for stochastic objectives
    se = bool(cfg.get("se", True)) and not stochastic
    diagnostics.write_all(output_dir, estimator, evaluations, results, options, se, trace)
    log.info(
        "loglik %.4f  ofv %.4f  converged %s (%d iterations, %.1f s)  -> %s",
        results["loglik"], results["ofv"], results["converged"], results["n_iter"],
        results["fit_seconds"], output_dir,
    )
    return results


def _fit_full_batch(cfg, estimator, fit_pop, dtype, output_dir, metadata, checkpoint):
    """Full-batch L-BFGS through Lightning, stopped cleanly by SIGINT/SIGTERM.

    Returns ``(convergence summary with fit time and warnings, parameter trace table)``.
    """
    from dataclasses import replace

    from deepnlme.inference.optimize import convergence_warning, stopping_gtol
    from deepnlme.training import (
        ConvergenceMonitor,
        FitTimer,
        NLMEFitModule,
        ParameterTrace,
        PopulationDataModule,
        build,
    )
    from deepnlme.training.interrupt import StopOnSignal

    outer, iterations_per_epoch = build.outer_options(cfg.method)
    outer = replace(outer, gtol=stopping_gtol(estimator, outer.gtol))
    module = NLMEFitModule(estimator, outer, iterations_per_epoch, metadata)
    if checkpoint is not None:
        _check_resumable(cfg.ckpt_path, checkpoint, module)
    monitor = ConvergenceMonitor(outer.gtol, outer.converged_gtol, outer.max_iter)
    timer, trace = FitTimer(), ParameterTrace()
    stop = StopOnSignal()
    trainer = build.build_trainer(cfg.trainer, output_dir, [monitor, timer, trace, stop])
    trainer.fit(
        module,
        datamodule=PopulationDataModule(fit_pop, dtype),
        ckpt_path=cfg.ckpt_path,
        weights_only=True,
    )
    if stop.received is not None:
        last = output_dir / "checkpoints" / f"{build.LAST_CHECKPOINT}.ckpt"
        raise cli.Interrupted(
            f"fit interrupted by {signal.Signals(stop.received).name} after {monitor.n_iter} "
            f"iterations; resume with ckpt_path={last}",
            stop.received,
        )
    not_converged = convergence_warning(
        monitor.converged, monitor.stop_reason, monitor.grad_max, outer.converged_gtol
    )
    summary = {
        **monitor.summary(),
        "fit_seconds": timer.seconds,
        "warnings": ([not_converged] if not_converged else []) + monitor.warnings,
    }
    return summary, trace.table()


def _fit_stochastic(cfg, estimator, fit_pop, dtype, output_dir, metadata):
    """VI, SAEM or NUTS (:func:`deepnlme.training.stochastic.fit_stochastic`).

    Returns ``(summary, None)``, or ``(None, None)`` on the non-reporting ranks of a
    data-parallel fit.
    """
    from deepnlme.inference.pyro.vi import NonFiniteObjective
    from deepnlme.training import build
    from deepnlme.training.stochastic import fit_stochastic

    try:
        trainer, summary = fit_stochastic(
            build.plain(cfg.method), build.plain(cfg.trainer), estimator, fit_pop,
            cfg.data.get("batch_subjects"), cfg.seed, dtype, output_dir, metadata,
            cfg.ckpt_path,
        )
    except (NonFiniteObjective, ValueError) as exc:
        raise cli.SetupError(str(exc)) from exc
    if trainer is not None and trainer.global_rank != 0:
        return None, None
    return summary, None


def _resume_checkpoint(ckpt_path: str | None) -> dict | None:
    """The checkpoint a fit resumes from (read safely), or None; unusable files are one line."""
    if ckpt_path is None:
        return None
    from deepnlme.fitted import read_checkpoint

    try:
        return read_checkpoint(ckpt_path)
    except ValueError as exc:
        raise cli.SetupError(f"cannot resume from ckpt_path {exc}") from None


def _check_resumable(ckpt_path: str, checkpoint: dict, module: NLMEFitModule) -> None:
    """Raise :class:`~deepnlme.cli.SetupError` unless ``checkpoint`` holds a training state of
    this run's model (same weight names and shapes)."""
    saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if saved != expected or "optimizer_states" not in checkpoint:
        differ = sorted(set(saved) ^ set(expected)) or [
            k for k in expected if saved.get(k) != expected[k]
        ]
        raise cli.SetupError(
            f"cannot resume from ckpt_path {ckpt_path}: it was written by another model or "
            f"method (weights differ: {differ[:4]}); resume with the same overrides as the run"
        )


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`train`; returns ``results[optimized_metric]`` for sweepers (e.g. Optuna)."""
    results = cli.run_command(train, cfg)
    with cli.exit_on_user_error():
        return cli.objective(results, cfg.get("optimized_metric"))


if __name__ == "__main__":
    sys.argv[1:] = cli.open_init_overrides(sys.argv[1:])
    main()
