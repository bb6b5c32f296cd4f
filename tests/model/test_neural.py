"""NeuralPKModel: untrained = classical model; inputs, prior, gradients and a short fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from deepnlme.data.synthetic import COVARIATES, synthetic_pk
from deepnlme.inference import InnerOptions, Laplace, OuterOptions, fit
from deepnlme.model.zoo.neural import NeuralPKModel
from deepnlme.model.zoo.pk import OneCmtOralModel
from deepnlme.nn import CovariateEtaMLP

ROOT = Path(__file__).resolve().parents[2]
INIT = {"tvka": 1.2, "tvcl": 4.0, "tvv": 40.0, "sigma_prop": 0.1}


@pytest.fixture(scope="module")
def pop():
    return synthetic_pk(16, seed=3, dtype=torch.float64)


def neural(**kw) -> NeuralPKModel:
    kw.setdefault("hidden", (6, 6))
    return NeuralPKModel(COVARIATES, **kw).double()


def randomize_output_layer(model: NeuralPKModel, scale: float = 0.3, seed: int = 1) -> None:
    """Give the zero-initialized output layer small random weights (so every weight matters)."""
    g = torch.Generator().manual_seed(seed)
    last = [m for m in model.net.layers if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.copy_(scale * torch.randn(last.weight.shape, generator=g))
        last.bias.copy_(scale * torch.randn(last.bias.shape, generator=g))


def test_untrained_network_is_the_plain_model(pop):
    omega = [0.09, 0.06, 0.04]
    plain = OneCmtOralModel(error="proportional", init={**INIT, "omega": omega}).double()
    model = neural(init={**INIT, "omega": omega})
    eta = 0.3 * torch.randn(len(pop), 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        model.observe(eta, pop).prediction, plain.observe(eta, pop).prediction, rtol=1e-12, atol=0
    )
    for k, v in plain.individual_parameters(eta, pop).items():
        torch.testing.assert_close(model.individual_parameters(eta, pop)[k], v)
    assert Laplace(model).loglik(pop) == pytest.approx(Laplace(plain).loglik(pop), rel=1e-10)


def test_inputs_follow_the_covariate_list(pop):
    model = NeuralPKModel(["CRCL", "WT"], hidden=(5,)).double()
    randomize_output_layer(model)
    assert model.covariates == ("CRCL", "WT")
    assert model.net.layers[0].in_features == 2 + model.n_eta
    eta = torch.zeros(len(pop), 3)
    base = model.observe(eta, pop).prediction

    def changed(name: str) -> bool:
        cov = pop.covariates.clone()
        cov[:, COVARIATES.index(name)] *= 1.3
        moved = model.observe(eta, replace(pop, covariates=cov)).prediction
        return not torch.allclose(moved, base)

    assert changed("CRCL") and changed("WT")
    assert not changed("AGE") and not changed("SEX")
    # The network sees (x - center) / scale in list order, then η.
    x = torch.stack([pop.covariate("CRCL"), pop.covariate("WT")], -1)
    expected = model.net((x - torch.tensor([100.0, 70.0])) / torch.tensor([40.0, 15.0]), eta)
    dev = 3.0 * torch.tanh(expected / 3.0)
    indiv = model.individual_parameters(eta, pop)
    torch.testing.assert_close(indiv["cl"], model.tvcl.value() * torch.exp(dev[:, 1]))
    renamed = replace(pop, covariate_names=["WT", "X", "SEX", "CRCL"])
    with pytest.raises(ValueError, match="AGE"):
        NeuralPKModel(["AGE"]).check_population(renamed)


def test_normalization_constants_and_fit_normalization(pop):
    model = NeuralPKModel(["WT", "CRCL"], normalization={"WT": [75.0, 10.0]})
    assert model.scaler.center.tolist() == [75.0, 100.0]
    assert model.scaler.scale.tolist() == [10.0, 40.0]
    with pytest.warns(UserWarning, match="DOSEGRP"):
        NeuralPKModel(["DOSEGRP"])
    model.fit_normalization(pop)
    torch.testing.assert_close(model.scaler.center[0], pop.covariate("WT").mean())
    torch.testing.assert_close(model.scaler.scale[1], pop.covariate("CRCL").std(unbiased=False))


def test_log_prior_is_the_l2_penalty():
    model = neural(weight_decay=0.7)
    randomize_output_layer(model)
    total = sum((w**2).sum() for w in model.net.parameters())
    torch.testing.assert_close(model.log_prior(), -0.5 * 0.7 * total)
    declared = {id(p.raw) for p in model.declared().values()}
    assert all(id(w) not in declared for w in model.net.parameters())
    assert neural(weight_decay=0.0).log_prior() == 0


def test_eta_weight_decay_weighs_the_eta_input_weights():
    model = neural(weight_decay=0.7, eta_weight_decay=5.0)
    randomize_output_layer(model)
    first = model.net.layers[0].weight
    on_eta = (first[:, len(COVARIATES) :] ** 2).sum()
    total = sum((w**2).sum() for w in model.net.parameters())
    torch.testing.assert_close(model.log_prior(), -0.5 * (0.7 * (total - on_eta) + 5.0 * on_eta))
    same = neural(weight_decay=0.7)
    assert same.eta_weight_decay == 0.7
    no_eta = neural(weight_decay=0.7, eta_weight_decay=5.0, eta_inputs=False)
    total = sum((w**2).sum() for w in no_eta.net.parameters())
    torch.testing.assert_close(no_eta.log_prior(), -0.5 * 0.7 * total)
    with pytest.raises(ValueError, match="eta_weight_decay"):
        neural(eta_weight_decay=-1.0)


def test_seeded_init_float64_and_zero_output():
    a, b, c = neural(seed=5), neural(seed=5), neural(seed=6)
    for wa, wb in zip(a.net.parameters(), b.net.parameters(), strict=True):
        assert torch.equal(wa, wb)
    assert not torch.equal(a.net.layers[0].weight, c.net.layers[0].weight)
    assert all(w.dtype == torch.float64 for w in a.parameters())
    assert a.scaler.center.dtype == torch.float64
    last = [m for m in a.net.layers if isinstance(m, torch.nn.Linear)][-1]
    assert (last.weight == 0).all() and (last.bias == 0).all()
    assert a.eta_names == ["eta1", "eta2", "eta3"]
    assert NeuralPKModel(COVARIATES, n_eta=2).eta_names == ["eta1", "eta2"]
    with pytest.raises(ValueError, match="activation"):
        CovariateEtaMLP(2, 1, 3, activation="relu")


def test_laplace_gradient_matches_finite_differences(pop):
    sub = pop.subset(list(range(6)))
    model = neural(init=INIT)
    randomize_output_layer(model, scale=0.2)
    est = Laplace(model, inner=InnerOptions(gtol=1e-11, max_iter=200))
    model.zero_grad()
    est.loss(sub).backward()
    weights = [model.net.layers[0].weight, model.net.layers[2].bias, model.net.layers[-1].weight]
    for w in weights:
        assert torch.isfinite(w.grad).all()
    h = 1e-6
    for w, idx in zip(weights, [(0, 0), (3,), (1, 2)], strict=True):
        old = w[idx].item()
        values = []
        for shifted in (old + h, old - h):
            with torch.no_grad():
                w[idx] = shifted
            values.append(float(est.loss(sub).detach()))
        with torch.no_grad():
            w[idx] = old
        up, down = values
        fd = (up - down) / (2 * h)
        assert w.grad[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_short_fit_increases_the_loglik(pop):
    model = neural(init=INIT, weight_decay=1.0)
    est = Laplace(model)
    before = est.loglik(pop)
    result = fit(est, pop, OuterOptions(max_iter=8))
    assert result.n_iter > 0
    assert est.loglik(pop) > before + 1.0
    assert torch.isfinite(torch.tensor(result.loss))


def test_config_instantiates_the_model():
    hydra_utils = pytest.importorskip("hydra.utils")
    data = OmegaConf.load(ROOT / "configs" / "data" / "synthetic_pk.yaml")
    model_cfg = OmegaConf.load(ROOT / "configs" / "model" / "deep_compartment.yaml")
    cfg = OmegaConf.create({"data": data, "model": model_cfg, "seed": 7})
    assert cfg.model._target_ == "deepnlme.model.zoo.neural.NeuralPKModel"
    model = hydra_utils.instantiate(cfg.model)
    assert isinstance(model, NeuralPKModel)
    assert model.covariates == tuple(data.covariates)
    assert list(cfg.model.fixed) == [] and dict(cfg.model.init) == {}
    # The main job feeds η to the network (with the stronger prior on those weights).
    assert model.eta_inputs and model.net.n_eta == model.n_eta == 3
    assert model.eta_weight_decay == model_cfg.eta_weight_decay > model.weight_decay
    ref = NeuralPKModel(
        list(data.covariates),
        hidden=list(model_cfg.hidden),
        eta_inputs=model_cfg.eta_inputs,
        seed=7,
    )
    assert torch.equal(model.net.layers[0].weight, ref.net.layers[0].weight)


def test_far_off_parameters_keep_the_density_finite(pop):
    """Concentrations that underflow (line-search trials) hit the floor, not log(0)."""
    model = neural(init={"tvka": 50.0, "tvcl": 5000.0, "tvv": 5.0})
    nll = Laplace(model).joint(torch.zeros(len(pop), 3), pop).nll
    assert torch.isfinite(nll).all()
    assert (model.observe(torch.zeros(len(pop), 3), pop).prediction >= 1e-30).all()
