"""Fit an NLME model: ``python train.py [model=...] [data=...] [method=...] [key=value ...]``.

Writes into the Hydra run directory: ``results.json``, ``estimates.csv``, ``predictions.csv``,
``ebes.csv``, ``gof.png`` and ``checkpoints/last.ckpt``. ``ckpt_path=RUN/checkpoints/last.ckpt``
resumes an interrupted fit. Bad data or a model that does not fit the data: one line on stderr
and exit status 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from deepnlme import diagnostics
from deepnlme.fitted import checkpoint_metadata
from deepnlme.training import (
    ConvergenceMonitor,
    FitTimer,
    NLMEFitModule,
    PopulationDataModule,
    build,
)

log = logging.getLogger("deepnlme.train")


def train(cfg: DictConfig, output_dir: Path) -> dict:
    """Fit, evaluate and write the run's outputs to ``output_dir``; returns results.json."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    build.set_threads(cfg)
    dtype = build.precision_dtype(cfg.trainer.precision)
    fit_pop, heldout_pop = build.load_data(cfg.data, dtype)
    regimen_pop = build.load_regimen_data(cfg.data, dtype)
    model, model_args = build.build_model(cfg.model, dtype)
    build.check_data(model, fit_pop)
    estimator = build.build_estimator(cfg.method, model)
    outer, iterations_per_epoch = build.outer_options(cfg.method)

    names = build.run_names(cfg, model, estimator)
    config = {**build.plain(cfg), "model": model_args}
    metadata = checkpoint_metadata(config, fit_pop.covariate_names, dtype, names)
    module = NLMEFitModule(estimator, outer, iterations_per_epoch, metadata)
    monitor = ConvergenceMonitor(outer.gtol, outer.converged_gtol, outer.max_iter)
    timer = FitTimer()
    trainer = build.build_trainer(cfg.trainer, output_dir, [monitor, timer])
    trainer.fit(
        module,
        datamodule=PopulationDataModule(fit_pop, dtype),
        ckpt_path=cfg.ckpt_path,
        weights_only=True,
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
    results = {
        **names,
        **diagnostics.likelihood_summary(model, evaluations[0]),
        **monitor.summary(),
        "fit_seconds": timer.seconds,
        **diagnostics.parameter_summary(model),
    }
    se = None
    if cfg.get("se", True):
        se = diagnostics.standard_errors(estimator, fit_pop)
        if se is None:
            log.info("no standard errors: the model has parameters besides θ, Ω and σ")
        else:
            results["se"] = se
    for evaluation in evaluations[1:]:
        results[evaluation.split] = evaluation.metrics()
    diagnostics.write_results(output_dir / "results.json", results)
    diagnostics.write_tables(output_dir, evaluations, model, se=se)
    log.info(
        "loglik %.4f  ofv %.4f  converged %s (%d iterations, %.1f s)  -> %s",
        results["loglik"], results["ofv"], results["converged"], results["n_iter"],
        results["fit_seconds"], output_dir,
    )
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    build.run_command(train, cfg)


if __name__ == "__main__":
    sys.argv[1:] = build.open_init_overrides(sys.argv[1:])
    main()
