"""Predict with a fitted model: ``python predict.py ckpt_path=RUN/checkpoints/last.ckpt``.

Reloads the checkpoint (safely: plain data only; the model class only from ``deepnlme`` or from
a module named in ``trusted_modules=[mymodels]``), finds each subject's η̂ from its own data at
the fitted parameters and writes ``results.json`` (log-likelihood of the given subjects),
``ebes.csv``, ``predictions.csv``, ``gof.png`` and the diagnostics of
:func:`deepnlme.diagnostics.write_all` (``se=true``: with the covariance step) into the Hydra
run directory. Without ``data=...`` the checkpoint's training data is used; an empty
``data.covariates`` means the covariates the model was trained with.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepnlme import cli

log = logging.getLogger("deepnlme.predict")


def predict(cfg: DictConfig, output_dir: Path) -> dict:
    """Evaluate the checkpoint on the configured subjects; returns results.json."""
    from deepnlme.training import mixed

    if mixed.is_mixed_checkpoint(str(cfg.ckpt_path)):
        return mixed.predict_mixed(cfg, output_dir)

    from deepnlme import diagnostics
    from deepnlme.training import build, commands

    options = build.diagnostic_options(cfg)
    fitted, pop, head = commands.load_run(cfg)
    evaluation = fitted.evaluate(pop, split="predict")
    results = {
        **head,
        **diagnostics.likelihood_summary(fitted.model, evaluation),
        **diagnostics.parameter_summary(fitted.model),
    }
    if cfg.get("loglik_is", False):
        from deepnlme.inference.pyro.importance import importance_summary

        results.update(importance_summary(fitted.model, fitted.estimator, evaluation, cfg))
    se = bool(cfg.get("se", False))
    diagnostics.write_all(output_dir, fitted.estimator, [evaluation], results, options, se)
    log.info("loglik %.4f of %d subjects  -> %s", results["loglik"], len(pop), output_dir)
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    cli.run_command(predict, cfg)


if __name__ == "__main__":
    main()
