"""NeuralODEPKModel: network off = closed form; integrator vs torchdiffeq; gradients; config."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from deepnlme.data.frames import population_from_frame
from deepnlme.data.synthetic import COVARIATES, synthetic_pk, synthetic_pk_regimen
from deepnlme.inference import InnerOptions, LaplaceEstimator
from deepnlme.model.zoo.neural_ode import NeuralODEPKModel, time_since_dose
from deepnlme.model.zoo.pk import OneCmtOralModel

ROOT = Path(__file__).resolve().parents[2]
INIT = {"tvka": 1.1, "tvcl": 6.0, "tvv": 42.0, "omega": [0.09, 0.06, 0.04]}


@pytest.fixture(scope="module")
def pops():
    single = synthetic_pk(9, seed=2, dtype=torch.float64)
    repeated = synthetic_pk_regimen(5, seed=2, dtype=torch.float64)
    infusion = population_from_frame(
        pd.DataFrame({
            "ID": ["a"] * 5, "TIME": [0.0, 1.0, 3.0, 6.0, 30.0], "AMT": [200.0, 0, 0, 0, 0],
            "RATE": [50.0, 0, 0, 0, 0], "CMT": [1, 2, 2, 2, 2], "WT": 80.0, "AGE": 40.0,
            "SEX": 1.0, "CRCL": 90.0,
        }),
        COVARIATES, "infusion", torch.float64,
    )
    return {"single": single, "repeated": repeated, "infusion": infusion}


def model(**kw) -> NeuralODEPKModel:
    return NeuralODEPKModel(COVARIATES, init=INIT, **kw).double()


def randomize(m: NeuralODEPKModel, scale: float = 0.5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = [m.dynamics.rhs.network.linears[-1], m.pre_net.layers[-1]]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(scale * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.3 * scale * torch.randn(layer.bias.shape, generator=g))


def eta_for(pop, seed=0):
    return 0.3 * torch.randn(len(pop), 3, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)


@pytest.mark.parametrize("above", [False, True])
@pytest.mark.parametrize("design", ["single", "repeated", "infusion"])
def test_network_off_equals_the_closed_form(pops, design, above):
    pop = pops[design]
    plain = OneCmtOralModel(error="proportional", init=INIT).double()
    eta = eta_for(pop)
    plain_eta = eta.clone()
    if above:  # ka = cl/v + tvka·exp(η_ka): the closed form at that ka
        k10 = INIT["tvcl"] / INIT["tvv"] * (eta[:, 1] - eta[:, 2]).exp()
        ka = INIT["tvka"] * eta[:, 0].exp() + k10
        plain_eta[:, 0] = torch.log(ka / INIT["tvka"])
    expected = plain.observe(plain_eta, pop).prediction
    # the exponential integrator is exact for a constant elimination rate, whatever the step
    got = model(max_step=50.0, absorption_above_elimination=above).observe(eta, pop).prediction
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    graded = model(step_growth=1.0, absorption_above_elimination=above)
    torch.testing.assert_close(graded.observe(eta, pop).prediction, expected, rtol=1e-9,
                               atol=1e-12)
    ode = model(solver="ode", rtol=1e-9, atol=1e-12, absorption_above_elimination=above)
    torch.testing.assert_close(ode.observe(eta, pop).prediction, expected, rtol=1e-6, atol=1e-9)


def test_absorption_stays_above_the_elimination_rate_at_zero_concentration(pops):
    pop = pops["single"]
    m = model()
    randomize(m)
    eta = eta_for(pop, 2)
    indiv = m.individual_parameters(eta, pop)
    k0 = m.elimination_rate(torch.zeros(len(pop), dtype=torch.float64), indiv)
    assert not torch.allclose(k0, indiv["cl"] / indiv["v"])  # the network moves k(0)
    excess = INIT["tvka"] * (eta[:, 0] + _pre_shift(m, pop)).exp()
    torch.testing.assert_close(indiv["ka"] - k0, excess)


def _pre_shift(m: NeuralODEPKModel, pop) -> torch.Tensor:
    """The covariate network's log-scale shift of ka ``(N,)``."""
    x = m.covariate_matrix(pop.baseline_covariates(), pop.obs_time)
    bound = m.max_log_deviation
    return bound * torch.tanh(m.pre_net(m.scaler(x), x[:, :0])[:, 0] / bound)


@pytest.mark.parametrize("design", ["single", "repeated"])
def test_exponential_integrator_converges_to_the_ode_solution(pops, design):
    pop = pops[design]
    eta = eta_for(pop, 1)
    ref_model = model(solver="ode", rtol=1e-10, atol=1e-12)
    randomize(ref_model)
    ref = ref_model.observe(eta, pop).prediction.detach()
    errors = []
    for step in (6.0, 1.0, 0.125):
        m = model(max_step=step)
        m.load_state_dict(ref_model.state_dict())
        got = m.observe(eta, pop).prediction.detach()
        errors.append(float(((got - ref).abs() / ref).max()))
    # the default step (6 h): within 5% for this network (steeper fitted networks integrate
    # less accurately at that step: experiments/neural_pk/README.md gives the figures)
    assert errors[0] < 5e-2
    assert errors[2] < 1e-3 and errors[2] < errors[1] / 4  # converges as the steps shrink


def test_time_since_dose_of_an_event_grid():
    inf = float("inf")
    start = torch.tensor([[0.0, 0.0, 1.0, 12.0, 12.0, 20.0], [0.0, 2.0, 2.0, 5.0, 7.0, 9.0]])
    jump = torch.zeros(2, 6, 2)
    jump[0, 1, 0] = 100.0  # a bolus at the end of segment 1: segment 2 starts at a dose
    jump[0, 3, 0] = 100.0
    rate = torch.zeros(2, 6, 2)
    rate[1, 3:5, 0] = 10.0  # an infusion over segments 3 and 4
    since = time_since_dose(start, rate, jump)
    expected = torch.tensor([[inf, inf, 0.0, 11.0, 0.0, 8.0], [inf, inf, inf, 0.0, 2.0, 4.0]])
    torch.testing.assert_close(since, expected)


def test_graded_steps_converge_and_beat_equal_steps_on_repeated_doses(pops):
    pop = pops["repeated"]
    eta = eta_for(pop, 1)
    ref_model = model(solver="ode", rtol=1e-10, atol=1e-12)
    randomize(ref_model, scale=1.5)
    ref = ref_model.observe(eta, pop).prediction.detach()
    mask = pop.obs_mask

    def median_error(**solver) -> float:
        m = model(**solver)
        m.load_state_dict(ref_model.state_dict())
        got = m.observe(eta, pop).prediction.detach()
        return float(((got - ref).abs() / ref)[mask].median())

    graded = [median_error(step_growth=growth, max_step=6.0 * growth, min_step=0.25 * growth)
              for growth in (1.0, 0.5, 0.25)]
    # second order in the step (halving every step: errors / 2.9 and / 3.4 here)
    assert graded[2] < graded[1] / 2.5 and graded[1] < graded[0] / 2.5
    assert graded[0] < median_error(max_step=6.0) / 3  # equal 6 h steps miss the peaks


def test_network_changes_the_elimination(pops):
    pop = pops["single"]
    m = model()
    eta = torch.zeros(len(pop), 3, dtype=torch.float64)
    base = m.observe(eta, pop).prediction
    with torch.no_grad():
        m.dynamics.rhs.network.linears[-1].bias.fill_(-0.5)  # clearance x exp(-0.5)
    slower = m.observe(eta, pop).prediction
    assert (slower[:, -1] > 1.3 * base[:, -1]).all()


def test_marginal_likelihood_gradient_matches_finite_differences(pops):
    pop = pops["single"].subset([0, 2])
    m = model(max_step=12.0, eta_inputs=True)
    randomize(m, scale=0.3)
    est = LaplaceEstimator(m, hessian="expected", inner=InnerOptions(gtol=1e-11, max_iter=200))
    m.zero_grad()
    est.loss(pop).backward()
    net = m.dynamics.rhs.network
    checks = [(m.tvcl.raw, ()), (net.linears[0].weight, (1, 6)), (net.linears[-1].weight, (0, 3))]
    h = 1e-6
    for w, idx in checks:
        old = w[idx].item()
        values = []
        for shifted in (old + h, old - h):
            with torch.no_grad():
                w[idx] = shifted
            values.append(float(est.loss(pop).detach()))
        with torch.no_grad():
            w[idx] = old
        fd = (values[0] - values[1]) / (2 * h)
        assert w.grad[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-6), (w.shape, idx)


def test_config_is_the_main_job_model():
    hydra_utils = pytest.importorskip("hydra.utils")
    data = OmegaConf.load(ROOT / "configs" / "data" / "synthetic_pk.yaml")
    model_cfg = OmegaConf.load(ROOT / "configs" / "model" / "neural_pk.yaml")
    cfg = OmegaConf.create({"data": data, "model": model_cfg, "seed": 7})
    m = hydra_utils.instantiate(cfg.model, _convert_="all")
    assert isinstance(m, NeuralODEPKModel)
    assert m.covariates == tuple(data.covariates) and m.eta_names == ["ka", "cl", "v"]
    assert m.dynamics.rhs.network.n_covariates == len(data.covariates)


def test_a_subject_solution_does_not_depend_on_the_batch(pops):
    # the mode search evaluates changing subsets of subjects: each subject's steps must come
    # from its own event grid, not from the longest segment of the batch
    single = pops["single"]
    for m in (model(), model(step_growth=1.0)):
        randomize(m)
        eta = eta_for(single, 3)
        together = m.observe(eta, single).prediction.detach()
        for i in range(len(single)):
            alone = m.observe(eta[i : i + 1], single.subset([i])).prediction.detach()
            width = alone.shape[1]
            torch.testing.assert_close(alone, together[i : i + 1, :width], rtol=1e-12,
                                       atol=1e-15)
