"""Parameter domains, declarations, initial values and the Namespace blocks."""

import pytest
import torch

from deepnlme.model import (
    Bounded,
    DiagonalCovariance,
    FullCovariance,
    NLMEModel,
    Param,
    Positive,
    RandomEffects,
    positive,
)
from deepnlme.model.zoo.pk import OneCmtOralModel, PhenoModel


@pytest.mark.parametrize(
    "domain, value",
    [
        (Positive(), torch.tensor(0.37)),
        (Bounded(-0.99, 10.0), torch.tensor(0.15)),
        (DiagonalCovariance(3), torch.diag(torch.tensor([0.4, 0.07, 0.02]))),
        (FullCovariance(2), torch.tensor([[0.5, 0.1], [0.1, 0.2]])),
    ],
)
def test_domain_round_trip(domain, value):
    assert torch.allclose(domain.to_natural(domain.to_raw(value)), value, atol=1e-12)


def test_full_covariance_is_positive_definite_for_any_raw():
    dom = FullCovariance(3)
    m = dom.to_natural(torch.randn(3, 3))
    assert torch.allclose(m, m.T)
    assert (torch.linalg.eigvalsh(m) > 0).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: positive(-1.0), "must be > 0"),
        (lambda: Param(Bounded(0, 1), 1.5), r"must lie in \(0.0, 1.0\)"),
        (lambda: RandomEffects(["a", "b"], [[1.0, 2.0], [2.0, 1.0]], "full"), "positive-definite"),
        (lambda: RandomEffects(["a"], [0.1], "banded"), "structure must be"),
    ],
)
def test_invalid_declarations(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_init_and_fixed_by_name():
    model = OneCmtOralModel(init={"tvv": 200.0, "omega": [0.2, 0.3, 0.4]}, fixed=["tvka"])
    p = model.param_values()
    assert float(p["tvv"]) == pytest.approx(200.0)
    assert torch.diagonal(p["omega"]).tolist() == pytest.approx([0.2, 0.3, 0.4])
    assert model.tvka.fixed and not model.tvv.fixed
    assert model.n_free_parameters() == 2 + 3 + 1


def test_unknown_init_name_is_rejected():
    with pytest.raises(KeyError, match="has no parameter 'tvq'"):
        OneCmtOralModel(init={"tvq": 1.0})


def test_declaration_order_and_eta_names():
    model = PhenoModel()
    assert list(model.declared()) == ["tvcl", "tvv", "apgar_v", "omega", "sigma_prop"]
    assert model.eta_names == ["cl", "v"]


def test_eta_prior_matches_multivariate_normal():
    class Two(NLMEModel):
        def __init__(self):
            super().__init__()
            self.omega_a = RandomEffects(["x", "y"], [[0.5, 0.2], [0.2, 0.3]], "full")
            self.omega_b = RandomEffects(["z"], [0.7])

    model = Two()
    eta = torch.randn(5, 3)
    want = torch.distributions.MultivariateNormal(
        torch.zeros(3), torch.block_diag(model.omega_a.value(), model.omega_b.value())
    ).log_prob(eta)
    assert torch.allclose(model.eta_log_prior(eta), want)
    assert model.eta_names == ["x", "y", "z"]


def test_namespace_names_the_missing_entry():
    model = OneCmtOralModel()
    eta = model.split_eta(torch.zeros(2, 3))
    with pytest.raises(AttributeError, match="no random effect named 'q'"):
        _ = eta.q


@pytest.mark.parametrize("structure", ["diagonal", "full"])
def test_random_effects_log_prob_is_the_multivariate_normal(structure):
    omega = [[0.4, 0.0, 0.0], [0.0, 0.07, 0.0], [0.0, 0.0, 0.02]]
    if structure == "full":
        omega = [[0.4, 0.05, 0.0], [0.05, 0.07, -0.01], [0.0, -0.01, 0.02]]
    block = RandomEffects(["ka", "cl", "v"], omega, structure)
    eta = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    want = torch.distributions.MultivariateNormal(torch.zeros(3), torch.tensor(omega))
    torch.testing.assert_close(block.log_prob(eta), want.log_prob(eta), rtol=1e-12, atol=1e-12)


def test_amounts_namespace_is_lazy_and_names_compartments():
    from deepnlme.data import load_dataset
    from deepnlme.model.base import Amounts

    pop = load_dataset("theophylline")
    model = OneCmtOralModel()
    indiv = model.individual_parameters(torch.zeros(len(pop), 3), pop)
    amounts = Amounts(model.dynamics, indiv, pop)
    assert amounts._values == {}
    central = amounts.central
    assert set(amounts._values) == {"central"}  # bolus-only: the depot was not computed
    torch.testing.assert_close(central, model.dynamics(indiv, pop)[..., 1])
    assert list(amounts) == ["depot", "central"]
    message = r"no compartment named 'peripheral'; available: \['depot', 'central'\]"
    with pytest.raises(AttributeError, match=message):
        _ = amounts.peripheral
