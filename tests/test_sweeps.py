"""Sweeps optimize: train.py returns ``results[optimized_metric]`` and an Optuna sweep of two
trials completes with the best trial's value."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepnlme import cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {"ofv": 360.3, "loglik": -180.15, "converged": True, "heldout": {"loglik": -40.5}}


def test_objective_is_the_named_results_entry():
    assert cli.objective(RESULTS, "ofv") == 360.3
    assert cli.objective(RESULTS, "heldout.loglik") == -40.5
    assert cli.objective(RESULTS, None) is None
    assert math.isnan(cli.objective({"loglik": None}, "loglik"))  # non-finite fit
    assert math.isnan(cli.objective({"ofv": math.inf}, "ofv"))


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("heldout.rmse", "optimized_metric 'heldout.rmse' is not in results.json"),
        ("aic", "optimized_metric 'aic' is not in results.json"),
        ("converged", "optimized_metric 'converged' is not a number (True)"),
        ("heldout", "optimized_metric 'heldout' is not a number"),
    ],
)
def test_objective_errors_are_setup_errors(metric, message):
    with pytest.raises(cli.SetupError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.objective(RESULTS, metric)


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_completes(tmp_path):
    """The README's sweep over network width and weight decay, two trials of a tiny fit."""
    overrides = [
        "-m", "hparams_search=neural_pk_optuna", "hydra.sweeper.n_trials=2",
        "data.n_subjects=40", "trainer.max_epochs=2", "method.iterations_per_epoch=4",
        "se=false", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads((tmp_path / str(i) / "results.json").read_text()) for i in (0, 1)]
    values = [t["heldout"]["loglik"] for t in trials]
    assert all(math.isfinite(v) for v in values)
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    assert best["best_value"] == pytest.approx(max(values), rel=1e-12)
    assert set(best["best_params"]) == {"model.hidden", "model.weight_decay"}
    assert best["best_params"]["model.hidden"] in ("[4]", "[8]", "[16]")
    assert 1.0 <= best["best_params"]["model.weight_decay"] <= 50.0
    best_dir = tmp_path / str(values.index(max(values)))
    best_trial = yaml.safe_load((best_dir / ".hydra" / "config.yaml").read_text())["model"]
    assert best_trial["weight_decay"] == best["best_params"]["model.weight_decay"]
