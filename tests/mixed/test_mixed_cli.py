"""``train.py model=mixed`` and ``predict.py`` on a formula-model checkpoint (contract)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from deepnlme.training import mixed
from tests.mixed.conftest import DATA

ROOT = Path(__file__).resolve().parents[2]
SLEEP = "model.formula='Reaction ~ Days + (Days|Subject)'"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(("data", "method"), [("insteval", "ml"), ("table", "reml"),
                                              ("table", "laplace")])
def test_formula_configs_compose(data, method):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", ["model=mixed", f"data={data}", f"method={method}"])
    assert mixed.is_formula_model(cfg) and cfg.model.family == "gaussian"
    assert mixed.resolve_method("gaussian", mixed.method_name(cfg.method)) == (
        "reml" if method == "reml" else "ml"
    )
    assert {"name", "path", "factors", "heldout_fraction", "split_seed"} <= set(cfg.data)


def test_train_heldout_and_predict_new_rows(tmp_path):
    out = tmp_path / "fit"
    proc = run("train.py", "model=mixed", "data=table", f"data.path={DATA / 'sleepstudy.csv'}",
               SLEEP, "method=ml", "data.heldout_fraction=0.2", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    for key in ("loglik", "deviance", "aic", "bic", "converged", "fit_seconds", "fixef",
                "se_fixef", "varcorr", "heldout"):
        assert key in results
    assert results["converged"] and list(results["fixef"]) == ["(Intercept)", "Days"]
    assert results["deviance"] == pytest.approx(-2 * results["loglik"])
    assert results["aic"] == pytest.approx(results["deviance"] + 2 * 6)
    assert set(results["varcorr"]) == {"Subject", "Residual"}
    assert results["heldout"]["n_obs"] == 36
    predictions = pd.read_csv(out / "heldout_predictions.csv")
    rmse = ((predictions["y"] - predictions["pred"]) ** 2).mean() ** 0.5
    assert results["heldout"]["rmse"] == pytest.approx(rmse)
    assert results["heldout"]["rmse"] < results["heldout"]["rmse_population"]
    ranef = pd.read_csv(out / "ranef.csv")
    assert len(ranef) == 36 and (ranef["cond_sd"] > 0).all()
    for png in ("ranef_hist.png", "heldout_residuals.png"):
        assert (out / png).stat().st_size > 1000

    new = tmp_path / "new.csv"
    new.write_text("Reaction,Days,Subject\n250,3,308\n300,5,999\n")
    pred_dir = tmp_path / "pred"
    proc = run("predict.py", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "data=table",
               f"data.path={new}", f"hydra.run.dir={pred_dir}")
    assert proc.returncode == 0, proc.stderr
    pred = pd.read_csv(pred_dir / "predictions.csv")
    fixef, level = results["fixef"], ranef[ranef["level"] == 308].set_index("name")["mode"]
    assert pred["pred_pop"][1] == pytest.approx(fixef["(Intercept)"] + 5 * fixef["Days"])
    assert pred["pred"][1] == pytest.approx(pred["pred_pop"][1])  # unseen subject 999
    assert pred["pred"][0] == pytest.approx(
        fixef["(Intercept)"] + level["(Intercept)"] + 3 * (fixef["Days"] + level["Days"])
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.formula='Reaction ~ Dayz + (1|Subject)'"], "column Dayz: not in the table"),
        (["model.family=ordinal", SLEEP], "row 1, column Reaction: an ordinal response must "
                                          "be an integer rating"),
        ([SLEEP, "method=reml", "model.family=poisson"], "method=reml does not fit a poisson"),
        ([SLEEP, "method=vi", "data.batch_rows=61", "trainer.devices=2",
          "trainer.strategy=ddp"], "data.batch_rows=61 is not divisible by the 2 devices"),
        ([SLEEP, "method=vi", "trainer=gpu"], "trainer=gpu needs a CUDA build of PyTorch"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    proc = run("train.py", "model=mixed", "data=table", f"data.path={DATA / 'sleepstudy.csv'}",
               *args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_batch_fit_resumes_from_its_checkpoint(tmp_path):
    """ml through Lightning, 5 L-BFGS-B iterations per epoch: a fit stopped after its first
    epoch and resumed from its checkpoint ends where the straight fit does; a checkpoint of
    another run is refused with one line."""
    from tests.test_cli import train

    args = ("model=mixed", "data=table", f"data.path={DATA / 'sleepstudy.csv'}", SLEEP,
            "method=ml", "model.iterations_per_epoch=5", "trainer.enable_progress_bar=false")
    straight = train(tmp_path / "a", *args)
    assert straight["converged"] and abs(straight["loglik"] - -875.9697) < 0.01
    first = train(tmp_path / "b", *args, "trainer.max_epochs=1")
    assert not first["converged"] and first["n_iter"] == 5
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    resumed = train(tmp_path / "c", *args, f"ckpt_path={ckpt}")
    assert resumed["converged"] and resumed["n_iter"] == straight["n_iter"]
    assert resumed["loglik"] == pytest.approx(straight["loglik"], abs=1e-9)
    assert resumed["fixef"] == pytest.approx(straight["fixef"], rel=1e-9)
    proc = run("train.py", *args[:-3], "method=reml", f"ckpt_path={ckpt}",
               f"hydra.run.dir={tmp_path / 'd'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot resume from ckpt_path" in proc.stderr.strip().splitlines()[-1]
