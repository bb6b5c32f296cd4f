"""Predict with a fitted model: ``python predict.py ckpt_path=RUN/checkpoints/last.ckpt``.

Reloads the checkpoint (safely: plain data only), finds each subject's η̂ from its own data at
the fitted parameters and writes ``results.json`` (log-likelihood of the given subjects),
``ebes.csv``, ``predictions.csv`` and ``gof.png`` into the Hydra run directory. Without
``data=...`` the checkpoint's training data is used; an empty ``data.covariates`` means the
covariates the model was trained with.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepnlme import diagnostics
from deepnlme.training import build, commands, mixed

log = logging.getLogger("deepnlme.predict")


def predict(cfg: DictConfig, output_dir: Path) -> dict:
    """Evaluate the checkpoint on the configured subjects; returns results.json."""
    if mixed.is_mixed_checkpoint(str(cfg.ckpt_path)):
        return mixed.predict_mixed(cfg, output_dir)
    fitted, pop, head = commands.load_run(cfg)
    evaluation = fitted.evaluate(pop, split="predict")
    results = {
        **head,
        **diagnostics.likelihood_summary(fitted.model, evaluation),
        **diagnostics.parameter_summary(fitted.model),
    }
    diagnostics.write_results(output_dir / "results.json", results)
    diagnostics.write_tables(output_dir, [evaluation])
    log.info("loglik %.4f of %d subjects  -> %s", results["loglik"], len(pop), output_dir)
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    build.run_command(predict, cfg)


if __name__ == "__main__":
    main()
