"""Variational inference for formula models (deepnlme.mixed.vi) and its Lightning runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deepnlme.inference.pyro.program import SubjectBatch
from deepnlme.mixed.lmm import fit_lmm
from deepnlme.mixed.vi import FormulaVI
from tests.mixed.conftest import DATA, design
from tests.test_cli import train

SLEEP = "Reaction ~ Days + (Days|Subject)"


def batch_of(vi: FormulaVI, index: torch.Tensor) -> SubjectBatch:
    return SubjectBatch(index, vi.table.subset(index))


def test_minibatch_losses_average_to_the_full_batch_loss():
    """With the step's noise fixed, the rows' part is scaled N/B: the mean of the losses of a
    partition of the rows into minibatches is the full-batch loss (prior and entropy of all
    levels are in every minibatch's loss)."""
    vi = FormulaVI(design("sleepstudy", SLEEP), "gaussian", "identity", seed=3)
    with torch.no_grad():
        vi.guide.terms[0].loc.normal_(0, 0.3)
    vi.step = 7
    torch.set_grad_enabled(False)
    order = torch.randperm(180, generator=torch.Generator().manual_seed(0))
    parts = [float(vi.loss(batch_of(vi, order[i : i + 60]))) for i in (0, 60, 120)]
    full = float(vi.loss(batch_of(vi, torch.arange(180))))
    assert sum(parts) / 3 == pytest.approx(full, rel=1e-12)
    assert max(parts) - min(parts) > 1.0  # the minibatches differ
    vi.step = 8
    assert float(vi.loss(batch_of(vi, torch.arange(180)))) != full  # new noise each step
    torch.set_grad_enabled(True)


def full_batch_fit(vi: FormulaVI, lr: float, steps: int = 800) -> FormulaVI:
    """``steps`` Adam steps on all rows, cosine schedule down to 2% of ``lr``."""
    params = [p for p in [*vi.model.parameters(), *vi.guide.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    whole = batch_of(vi, torch.arange(len(vi.table)))
    for step in range(steps):
        vi.step = step
        optimizer.zero_grad()
        vi.loss(whole).backward()
        optimizer.step()
        schedule.step()
    return vi


def test_vi_ordinal_reaches_the_clmm_fit_of_wine():
    """Ordinal cumulative logit (thresholds fitted as parameters of the Pyro model): the
    Laplace log-likelihood at the VI estimates is within 0.01 of clmm's optimum (−81.565),
    with its estimates and threshold standard errors."""
    vi = full_batch_fit(
        FormulaVI(design("wine", "rating ~ temp + contact + (1|judge)"), "ordinal", "logit"),
        lr=0.05,
    )
    fit = vi.result()
    assert fit.loglik > -81.5654 - 0.01
    assert fit.thresholds == pytest.approx([-1.6237, 1.5134, 4.2285, 6.0888], abs=0.03)
    assert fit.fixef["tempwarm"] == pytest.approx(3.0630, abs=0.03)
    assert fit.se_thresholds == pytest.approx([0.6824, 0.6038, 0.8090, 0.9725], rel=0.02)
    assert fit.varcorr()["judge"]["var"] == pytest.approx([1.279], rel=0.05)


def test_vi_reaches_the_ml_fit_of_sleepstudy():
    """The guide's family holds the exact conditional posterior of one grouping factor (full
    covariance within a level), so variational EM's optimum is the ML fit: after 800 Adam
    steps the estimates are within noise of lme4's, and the ELBO is below the exact
    log-likelihood at the estimates."""
    d = design("sleepstudy", SLEEP)
    vi = full_batch_fit(FormulaVI(d, "gaussian", "identity", seed=0), lr=0.08)
    fit, ml = vi.result(), fit_lmm(d)
    assert abs(fit.loglik - -875.9697) < 0.1
    assert fit.fixef["(Intercept)"] == pytest.approx(251.4051, rel=0.01)
    assert fit.fixef["Days"] == pytest.approx(10.4673, rel=0.01)
    sds = fit.varcorr()["Subject"]["sd"]
    assert sds == pytest.approx([23.780, 5.717], rel=0.03)
    assert fit.sigma == pytest.approx(25.592, rel=0.03)
    for name, se in ml.se_fixef.items():  # GLS standard errors at the VI estimates
        assert fit.se_fixef[name] == pytest.approx(se, rel=0.05)
    modes = fit.modes[0]
    ml_modes = ml.modes[0]
    # posterior means vs conditional modes: within a tenth of the effects' SDs
    assert (abs(modes.mode - ml_modes.mode) < 0.1 * np.array(sds)).all()
    ratio = modes.sd / ml_modes.sd  # q's SDs (noisier: a gradient step each, few steps)
    assert abs(np.median(ratio) - 1) < 0.1 and abs(ratio - 1).max() < 0.3
    assert vi.elbo_value() < fit.loglik


def run_vi(out: Path, *overrides: str) -> dict:
    return train(out, "model=mixed", "data=table", f"data.path={DATA / 'sleepstudy.csv'}",
                 f"model.formula='{SLEEP}'", "method=vi", "data.batch_rows=60",
                 "trainer.enable_progress_bar=false", *overrides)


@pytest.mark.slow
def test_vi_command_line_resumes_and_runs_data_parallel(tmp_path):
    """train.py method=vi: results.json keys, conditional means, held-out metrics; a fit
    stopped after 3 steps and resumed from its checkpoint ends where the straight fit does;
    two processes (DDP, gloo) with half of each 60-row batch each give the same fit."""
    steps = ("method.mixed.steps=6", "method.mixed.checkpoint_every=3")
    straight = run_vi(tmp_path / "a", *steps, "data.heldout_fraction=0.2")
    for key in ("loglik", "elbo", "fixef", "se_fixef", "varcorr", "heldout", "fit_seconds"):
        assert key in straight
    assert straight["n_iter"] == 6 and straight["method"] == "vi"
    assert straight["elbo"] < straight["loglik"]
    ranef = pd.read_csv(tmp_path / "a" / "ranef.csv")
    assert len(ranef) == 36 and (ranef["cond_sd"] > 0).all()
    assert straight["heldout"]["n_obs"] == 36

    run_vi(tmp_path / "b", *steps, "data.heldout_fraction=0.2", "+trainer.max_steps=3")
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    resumed = run_vi(tmp_path / "c", *steps, "data.heldout_fraction=0.2", f"ckpt_path={ckpt}")
    assert resumed["n_iter"] == 6
    assert resumed["fixef"] == pytest.approx(straight["fixef"], rel=1e-10)
    assert resumed["varcorr"]["Residual"]["var"] == pytest.approx(
        straight["varcorr"]["Residual"]["var"], rel=1e-10
    )

    two = run_vi(tmp_path / "d", *steps, "data.heldout_fraction=0.2", "trainer.devices=2",
                 "trainer.strategy=ddp")
    assert two["fixef"] == pytest.approx(straight["fixef"], rel=1e-9)
    assert two["varcorr"]["Subject"]["var"] == pytest.approx(
        straight["varcorr"]["Subject"]["var"], rel=1e-9
    )
    saved = json.loads((tmp_path / "d" / "results.json").read_text())
    assert saved["n_iter"] == 6


def test_low_rank_guide_density_is_the_joint_gaussian():
    """q(b) with per-level blocks plus a rank-3 part: draws and log density equal the dense
    Gaussian with covariance blockdiag(L_j L_jᵀ) + W Wᵀ."""
    from deepnlme.mixed.vi import LevelGuide

    guide = LevelGuide([(4, 2), (3, 1)], 0.5, rank=3, seed=1).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    eps = [torch.randn(4, 2, generator=g, dtype=torch.float64),
           torch.randn(3, 1, generator=g, dtype=torch.float64)]
    z = torch.randn(3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        b, log_q = guide.sample(eps, z)
    loc = torch.cat([m.reshape(-1) for m, _ in guide.posterior()]).detach()
    cov = torch.block_diag(*[Lj @ Lj.T for _, L in guide.posterior() for Lj in L])
    cov = (cov + guide.factor @ guide.factor.T).detach()
    x = torch.cat([bk.reshape(-1) for bk in b])
    dense = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)
    assert float(log_q) == pytest.approx(float(dense.log_prob(x)), rel=1e-10)
    sd = torch.cat([s.reshape(-1) for s in guide.marginal_sd()]).detach()
    assert torch.allclose(sd, torch.sqrt(torch.diagonal(cov)))
