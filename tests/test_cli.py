"""The command line: train.py / predict.py as subprocesses, their run directories and errors.

Reference values: Theophylline, one-compartment oral, additive error, Laplace (nlme/NONMEM
LAPLACIAN agree); Phenobarbital, NONMEM's pheno with FOCEI (NONMEM OFV 586.276).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import predict as predict_module
import train as train_module
from deepnlme.data import DataValidationError, load_population
from deepnlme.training import build

ROOT = Path(__file__).resolve().parents[1]
THEO = ("model=one_cmt_oral", "data=theophylline", "method=laplace")
RESULT_KEYS = {
    "model", "method", "data", "n_subjects", "n_obs", "loglik", "ofv", "ofv_nonmem", "aic",
    "bic", "n_parameters", "converged", "n_iter", "grad_max", "fit_seconds", "params", "omega",
}


def run(script: str, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python SCRIPT overrides...`` with the working tree importable; output captured."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def train(run_dir: Path, *overrides: str, cwd: Path = ROOT) -> dict:
    """Run train.py into ``run_dir``; returns results.json."""
    proc = run("train.py", *overrides, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def user_error(*overrides: str, script: str = "train.py") -> str:
    """Run a command that must fail cleanly; returns its one stderr line."""
    proc = run(script, *overrides, "hydra.run.dir=/tmp/deepnlme-test-never-written")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def in_process():
    """``train.main``'s work in this process: compose the overrides, run ``train.train``
    (without the diagnostics' plots unless a test asks for them: the subprocess runs have
    them)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):

        def train_in_process(run_dir: Path, *overrides: str) -> dict:
            quick = [] if any(o.startswith("diagnostics.plots") for o in overrides) else [
                "diagnostics.plots=false"]
            cfg = compose("train", build.open_init_overrides([*quick, *overrides]))
            with build.exit_on_user_error():
                return train_module.train(cfg, run_dir)

        yield train_in_process


def in_process_error(train_in_process, capsys, tmp_path, *overrides: str) -> str:
    """The one stderr line of a run that must stop with a user error (exit status 1)."""
    with pytest.raises(SystemExit) as stopped:
        train_in_process(tmp_path, *overrides)
    assert stopped.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def theo_run(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("theo")
    return run_dir, train(run_dir, *THEO)


@pytest.mark.slow
def test_theophylline_laplace_results(theo_run):
    run_dir, r = theo_run
    assert RESULT_KEYS <= set(r)
    assert (r["model"], r["method"], r["data"]) == ("one_cmt_oral", "laplace", "theophylline")
    assert (r["n_subjects"], r["n_obs"], r["n_parameters"]) == (12, 132, 7)
    assert r["loglik"] == pytest.approx(-180.153, abs=0.01)
    assert r["ofv"] == pytest.approx(-2 * r["loglik"])
    assert r["ofv_nonmem"] == pytest.approx(r["ofv"] - 132 * math.log(2 * math.pi))
    assert r["aic"] == pytest.approx(r["ofv"] + 14)
    assert r["bic"] == pytest.approx(r["ofv"] + 7 * math.log(132))
    assert r["converged"] is True and r["n_iter"] > 0 and r["grad_max"] < 1e-3
    assert r["stop_reason"] in ("gradient below gtol", "no progress")
    assert r["warnings"] == []  # a well-determined fit: no false alarm
    assert r["fit_seconds"] > 0
    p = r["params"]
    assert set(p) == {"tvka", "tvcl", "tvv", "omega", "sigma_add"}
    for name, ref in {"tvka": 1.5789, "tvcl": 0.04004, "tvv": 0.4575, "sigma_add": 0.6912}.items():
        assert p[name] == pytest.approx(ref, rel=0.01), name
    block = r["omega"]["omega"]
    assert block["names"] == ["ka", "cl", "v"]
    assert p["omega"] == block["cov"]
    sds = [math.sqrt(block["cov"][i][i]) for i in range(3)]
    assert sds == pytest.approx([0.6526, 0.2652, 0.1339], rel=0.01)
    # Standard errors: relative SEs of ka, cl, v are the SEs of their logs, which R nlme
    # reports on these data as 0.1977, 0.0845, 0.0463 (its own approximation: within 5%).
    se = r["se"]
    assert set(se) == set(p)
    rse = [se[name] / p[name] for name in ("tvka", "tvcl", "tvv")]
    assert rse == pytest.approx([0.1977, 0.0845, 0.0463], rel=0.05)
    assert all(0 < se["omega"][i][i] < block["cov"][i][i] for i in range(3))
    assert "heldout" not in r


@pytest.mark.slow
def test_theophylline_run_directory(theo_run):
    run_dir, _ = theo_run
    for name in ("estimates.csv", "predictions.csv", "ebes.csv", "gof.png", ".hydra/config.yaml",
                 "parameters.csv", "shrinkage.csv", "report.md", "convergence.png", "pcvpc.png"):
        assert (run_dir / name).exists(), name
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert list(predictions.columns) == [
        "ID", "TIME", "TAD", "DV", "PRED", "IPRED", "IWRES", "CPRED", "CWRES", "CIWRES", "NPD",
        "NPDE", "CMT", "split"
    ]
    assert len(predictions) == 132 and set(predictions["split"]) == {"fit"}
    ebes = pd.read_csv(run_dir / "ebes.csv")
    assert len(ebes) == 12 and {"eta_ka", "eta_cl", "eta_v", "ka", "cl", "v"} <= set(ebes)
    estimates = pd.read_csv(run_dir / "estimates.csv")
    assert {"name", "value", "se", "domain"} <= set(estimates.columns)
    results = json.loads((run_dir / "results.json").read_text())
    row = estimates.set_index("name").loc["tvka"]
    assert (row["value"], row["se"]) == (results["params"]["tvka"], results["se"]["tvka"])

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    meta = checkpoint["deepnlme"]
    assert meta["covariate_names"] == ["WT"]
    assert meta["config"]["model"]["_target_"] == "deepnlme.model.zoo.pk.OneCmtOralModel"
    assert meta["names"]["method"] == "laplace"


@pytest.mark.slow
def test_predict_round_trip_gives_the_same_loglik(theo_run, tmp_path):
    run_dir, r = theo_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run("predict.py", f"ckpt_path={ckpt}", "data=theophylline", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = json.loads((tmp_path / "results.json").read_text())
    assert predicted["loglik"] == pytest.approx(r["loglik"], abs=1e-6)
    assert (predicted["n_subjects"], predicted["n_obs"]) == (12, 132)
    fit_ebes = pd.read_csv(run_dir / "ebes.csv")
    new_ebes = pd.read_csv(tmp_path / "ebes.csv")
    assert new_ebes["eta_cl"].to_numpy() == pytest.approx(fit_ebes["eta_cl"].to_numpy(), abs=1e-6)
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 132


@pytest.mark.slow
def test_pheno_focei_matches_nonmem(in_process, tmp_path):
    r = in_process(tmp_path, "model=pheno", "data=phenobarbital", "method=focei",
                   "diagnostics.covariance=sandwich")
    assert r["ofv_nonmem"] == pytest.approx(586.276, abs=0.01)
    # NONMEM's covariance step (sandwich) and shrinkage for this run, at our own estimates
    se = r["se"]
    assert [se["tvcl"], se["tvv"], se["apgar_v"]] == pytest.approx(
        [2.10e-4, 2.69e-2, 8.38e-2], rel=0.02)
    assert [se["omega"][0][0], se["omega"][1][1]] == pytest.approx([1.34e-2, 7.48e-3], rel=0.02)
    assert r["covariance_step"]["status"] == "ok"
    shrink = r["shrinkage"]
    assert [shrink["eta_sd_pct"]["cl"], shrink["eta_sd_pct"]["v"], shrink["eps_sd_pct"]] == (
        pytest.approx([47.130, 12.839, 21.198], abs=0.3))
    assert r["converged"] is True
    p = r["params"]
    for name, ref in {"tvcl": 0.0046956, "tvv": 0.98426, "apgar_v": 0.15892}.items():
        assert p[name] == pytest.approx(ref, rel=0.01), name
    cov = r["omega"]["omega"]["cov"]
    assert [cov[0][0], cov[1][1]] == pytest.approx([0.029351, 0.027906], rel=0.01)
    assert p["sigma_prop"] ** 2 == pytest.approx(0.013241, rel=0.01)


@pytest.mark.slow
def test_resume_from_checkpoint(in_process, tmp_path):
    short = ("method.iterations_per_epoch=5",)
    first = in_process(tmp_path / "a", *THEO, *short, "trainer.max_epochs=1")
    assert first["converged"] is False and first["n_iter"] == 5
    assert first["stop_reason"] == "max_epochs reached"
    assert first["warnings"][0].startswith(
        "the fit did not converge: it stopped with max_epochs reached"
    )
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = in_process(tmp_path / "b", *THEO, *short, f"ckpt_path={ckpt}")
    assert resumed["converged"] is True and resumed["n_iter"] > 5
    assert resumed["loglik"] == pytest.approx(-180.153, abs=0.01)


@pytest.mark.slow
def test_heldout_metrics(in_process, tmp_path):
    r = in_process(tmp_path, *THEO, "data.heldout_fraction=0.25", "data.split_seed=2")
    held = r["heldout"]
    assert set(held) == {"n_subjects", "n_obs", "loglik", "rmse_ipred", "rmse_pred"}
    assert held["n_subjects"] == 3 and r["n_subjects"] == 9
    assert held["n_obs"] + r["n_obs"] == 132
    assert held["loglik"] < 0 and 0 < held["rmse_ipred"] < held["rmse_pred"]
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert (predictions["split"] == "heldout").sum() == held["n_obs"]


def test_bad_csv_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,TIME,DV,AMT,EVID,MDV,CMT\n1,0,.,100,1,1,1\n1,1,5,-3,0,0,0\n")
    with pytest.raises(DataValidationError) as expected:
        load_population(bad)
    line = user_error("model=one_cmt_oral", "data=csv", f"data.path={bad}")
    assert line == f"error: {expected.value}"


def test_compartment_outside_the_model_is_one_line(in_process, capsys, tmp_path):
    bad = tmp_path / "cmt.csv"
    bad.write_text("ID,TIME,DV,AMT,EVID,MDV,CMT\n1,0,.,100,1,1,1\n1,1,5,0,0,0,7\n")
    line = in_process_error(
        in_process, capsys, tmp_path, "model=one_cmt_oral", "data=csv", f"data.path={bad}"
    )
    assert line.startswith(f"error: {bad}: row 2, column CMT: CMT 7 exceeds")


def test_non_finite_start_is_one_line_naming_the_observation(in_process, capsys, tmp_path):
    line = in_process_error(
        in_process, capsys, tmp_path, "model=one_cmt_oral", "data=theophylline",
        "model.error=proportional",
    )
    assert line.startswith(
        "error: theophylline: row 2, column DV: ID 1, TIME 0, DV 0.74: the log-likelihood is "
        "not finite at the starting estimates"
    )
    assert "model.error=combined" in line
    assert not (tmp_path / "results.json").exists()


def test_table_without_observations_is_one_line(in_process, capsys, tmp_path):
    doses = tmp_path / "doses.csv"
    doses.write_text("ID,TIME,DV,AMT,EVID,MDV,CMT\n1,0,.,100,1,1,1\n2,0,.,100,1,1,1\n")
    line = in_process_error(
        in_process, capsys, tmp_path, "model=one_cmt_oral", "data=csv", f"data.path={doses}"
    )
    assert line == (
        f"error: {doses}: row 0, column DV: the table has no observations (rows with EVID 0 "
        "and MDV 0 and a DV); nothing to fit"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of CPU-only PyTorch")
def test_gpu_trainer_without_cuda_is_one_line(in_process, capsys, tmp_path):
    line = in_process_error(in_process, capsys, tmp_path, *THEO, "trainer=gpu")
    assert line.startswith(
        f"error: trainer=gpu needs a CUDA build of PyTorch, and this one ({torch.__version__}) "
        "is CPU-only; install one with: pip install torch==2.13.0 --index-url "
        "https://download.pytorch.org/whl/"
    )


def test_missing_covariate_is_one_line(in_process, capsys, tmp_path):
    line = in_process_error(in_process, capsys, tmp_path, "model=pheno", "data=theophylline")
    assert line.startswith("error: PhenoModel needs covariates") and "APGAR" in line


def test_unknown_initial_parameter_is_one_line(in_process, capsys, tmp_path):
    line = in_process_error(in_process, capsys, tmp_path, *THEO, "model.init.foo=1")
    assert line.startswith("error: model deepnlme.model.zoo.pk.OneCmtOralModel: ")
    assert "no parameter 'foo'" in line


USER_MODEL = '''
    import torch

    from deepnlme.dynamics import OneCmtOral
    from deepnlme.likelihood import residual
    from deepnlme.model import NLMEModel, RandomEffects, positive


    class ClearanceOnly(NLMEModel):
        """ka and V fixed effects only; η on clearance."""

        covariates = ("WT",)

        def __init__(self, sigma: float = 0.7):
            super().__init__()
            self.tvka = positive(1.5)
            self.tvcl = positive(0.04)
            self.tvv = positive(0.45)
            self.omega = RandomEffects(["cl"], [0.07])
            self.sigma_add = positive(sigma)
            self.dynamics = OneCmtOral()

        def pre(self, p, eta, cov):
            n = cov.WT.shape[0]
            return {"ka": p.tvka.expand(n), "cl": p.tvcl * torch.exp(eta.cl),
                    "v": p.tvv.expand(n)}

        def derived(self, p, indiv, amounts, cov):
            return residual.additive(amounts.central / indiv.v[:, None], p.sigma_add)
'''


@pytest.mark.slow
def test_user_model_class_from_the_working_directory(tmp_path):
    """``model._target_=`` names a class in the user's own module; initial values and fixed
    parameters come from the command line (``model.init.NAME=`` needs no ``+``)."""
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(USER_MODEL))
    r = train(
        tmp_path / "run",
        "model=custom", "model._target_=usermodels.ClearanceOnly", "+model.sigma=0.5",
        "model.init.tvv=0.3", "model.fixed=[tvv]", "data=theophylline", "trainer.max_epochs=2",
        cwd=tmp_path,
    )
    assert r["model"] == "ClearanceOnly" and r["model_class"] == "usermodels.ClearanceOnly"
    assert set(r["params"]) == {"tvka", "tvcl", "tvv", "omega", "sigma_add"}
    assert r["params"]["tvv"] == pytest.approx(0.3)  # init override, held fixed
    assert r["omega"]["omega"]["names"] == ["cl"]
    assert r["n_parameters"] == 4  # tvka, tvcl, omega, sigma_add


@pytest.mark.slow
def test_main_job_runs(tmp_path):
    short = ("trainer.max_epochs=1", "method.iterations_per_epoch=4", "data.n_subjects=24",
             "data.heldout_regimen.n_subjects=6")
    r = train(tmp_path, *short)
    assert (r["model"], r["data"], r["method"]) == ("neural_pk", "synthetic_pk", "focei")
    assert RESULT_KEYS <= set(r)
    assert r["n_subjects"] == 18 and r["heldout"]["n_subjects"] == 6  # heldout_fraction 0.25
    assert set(r["heldout_regimen"]) == set(r["heldout"])  # the same metrics
    assert r["heldout_regimen"]["n_subjects"] == 6 and r["heldout_regimen"]["n_obs"] == 66
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def readme_custom_model_example() -> tuple[str, list[str]]:
    """The README's ``mymodels.py`` and the overrides of its ``model=custom`` command."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Writing a model"):]
    code = section[section.index("```python\n# mymodels.py") + len("```python\n"):]
    code = code[: code.index("```")]
    command = next(
        line for line in section.splitlines() if line.startswith("python3 train.py model=custom")
    )
    return code, command.split()[2:]


@pytest.mark.slow
def test_readme_custom_model_example_runs_clean(tmp_path, monkeypatch, caplog, in_process):
    code, overrides = readme_custom_model_example()
    assert overrides[:2] == ["model=custom", "model._target_=mymodels.WeightOnClearance"]
    (tmp_path / "mymodels.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("WARNING"):
        r = in_process(tmp_path / "run", *overrides, "trainer.enable_progress_bar=false")
    assert [rec for rec in caplog.records if rec.levelname == "WARNING"] == []
    assert r["model"] == "WeightOnClearance" and r["converged"] is True
    # cl_wt = 0 is the one-compartment model (-180.153): the covariate can only help
    assert r["loglik"] > -180.153 - 0.01 and r["n_parameters"] == 8
    assert set(r["se"]) == set(r["params"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose("predict", [f"ckpt_path={ckpt}", "trusted_modules=[mymodels]"])
    (tmp_path / "predict").mkdir()
    predicted = predict_module.predict(cfg, tmp_path / "predict")
    assert predicted["loglik"] == pytest.approx(r["loglik"], abs=1e-4)
