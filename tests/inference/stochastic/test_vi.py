"""The model as a Pyro program and the variational objectives against exact values.

For a linear Gaussian mixed model the posterior of each η_i is Gaussian and equals its Laplace
approximation; with the guide set to it, log p(y_i, η) - log q(η) = log p(y_i) for every draw,
so the ELBO and the IWAE bound equal the exact marginal log-likelihood whatever the noise
(and a minibatch gives N/B times its subjects' share).
"""

import pytest
import torch

from deepnlme.data.population import Population
from deepnlme.inference.pyro.guides import AmortizedGuide, dose_history
from deepnlme.inference.pyro.importance import mode_proposal
from deepnlme.inference.pyro.program import SubjectBatch, whole
from deepnlme.inference.pyro.vi import NonFiniteObjective, VariationalEstimator, gaussian_kl
from deepnlme.model.zoo.pk import OneCmtOralModel
from tests.inference.linear_model import RandomSlopeModel, exact_loglik, random_slope_population


def exact_guide(elbo: str, particles: int = 1):
    pop = random_slope_population(n=7)
    model = RandomSlopeModel()
    est = VariationalEstimator(model, guide="subject", elbo=elbo, num_particles=particles)
    guide = est.setup(pop)
    loc, scale_tril = mode_proposal(model, pop)
    with torch.no_grad():
        guide.loc.copy_(loc)
        guide.offdiag.copy_(scale_tril[:, 1, 0:1])
        diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1) - 1e-5
        guide.diag_raw.copy_(diag + torch.log(-torch.expm1(-diag)))
    return pop, model, est


@pytest.mark.parametrize("elbo,particles", [("trace", 1), ("trace", 3), ("iwae", 4)])
def test_bound_is_exact_at_the_true_posterior(elbo, particles):
    pop, model, est = exact_guide(elbo, particles)
    exact = exact_loglik(model, pop)
    for step in range(3):
        est.step = step
        assert -est.loss(whole(pop)).item() == pytest.approx(exact, abs=1e-8)


def test_minibatch_is_scaled_to_the_population():
    pop, model, est = exact_guide("trace")
    index = torch.tensor([1, 4, 5])
    batch = SubjectBatch(index, pop.subset(index))
    part = exact_loglik(model, pop.subset(index))
    assert -est.loss(batch).item() == pytest.approx(len(pop) / 3 * part, abs=1e-8)


def test_elbo_below_the_likelihood_and_gradients_reach_every_parameter():
    pop = random_slope_population(n=7)
    model = RandomSlopeModel()
    est = VariationalEstimator(model, guide="amortized", num_particles=2)
    guide = est.setup(pop)
    assert est.elbo_value(pop, particles=256) < exact_loglik(model, pop)
    est.loss(whole(pop)).backward()
    for name, p in [*model.named_parameters(), *guide.named_parameters()]:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(model.omega.raw.grad.abs().sum()) > 0
    assert float(guide.head[-1].weight.grad.abs().sum()) > 0


def test_bad_settings_and_non_finite_objective():
    model = OneCmtOralModel()
    with pytest.raises(ValueError, match="unknown guide 'flow'"):
        VariationalEstimator(model, guide="flow")
    with pytest.raises(ValueError, match="unknown elbo"):
        VariationalEstimator(model, elbo="renyi")
    pop = random_slope_population(n=3)
    model = RandomSlopeModel()
    est = VariationalEstimator(model)
    est.setup(pop)
    with torch.no_grad():
        model.sigma.raw.fill_(float("nan"))
    with pytest.raises(NonFiniteObjective, match="not finite at step 0"):
        est.loss(whole(pop))


def dosed_population() -> Population:
    """Two subjects: three doses then observations (one before any dose), and one with fewer
    observations (padding)."""
    t = torch.tensor([[-1.0, 0.5, 3.0, 13.0], [2.0, 6.0, 0.0, 0.0]], dtype=torch.float64)
    dv = torch.tensor([[0.0, 4.0, 2.0, 5.0], [3.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    dose_t = torch.tensor([[0.0, 2.0, 12.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    amt = torch.tensor([[100.0, 50.0, 25.0], [80.0, 0.0, 0.0]], dtype=torch.float64)
    dose_mask = torch.tensor([[True, True, True], [True, False, False]])
    zl = torch.zeros(2, 4, dtype=torch.long)
    zd = torch.zeros(2, 3, dtype=torch.float64)
    return Population(
        ids=["a", "b"], covariate_names=["WT"], obs_time=t, obs_dv=dv, obs_cmt=zl,
        obs_mask=mask, obs_epoch=zl.clone(), obs_row=zl.clone(), dose_time=dose_t,
        dose_amt=amt, dose_rate=zd.clone(), dose_duration=zd.clone(), dose_cmt=zd.long(),
        dose_ss=zd.long(), dose_ii=zd.clone(), dose_mask=dose_mask, dose_epoch=zd.long(),
        covariates=torch.tensor([[70.0], [55.0]], dtype=torch.float64),
        obs_covariates=torch.tensor([[[70.0]], [[55.0]]], dtype=torch.float64).expand(2, 4, 1),
        subject_index=torch.arange(2),
    )


def test_dose_history_before_each_observation():
    since, amount, total = dose_history(dosed_population())
    mask = dosed_population().obs_mask
    assert since[mask].tolist() == [-1.0, 0.5, 1.0, 1.0, 2.0, 6.0]  # before any dose: time
    assert amount[mask].tolist() == [0.0, 100.0, 50.0, 25.0, 80.0, 80.0]
    assert total[mask].tolist() == [0.0, 100.0, 150.0, 175.0, 80.0, 80.0]


def test_encoder_ignores_padding_and_other_subjects():
    """q(η) of a subject is the same alone and in a padded batch with a longer record."""
    pop = dosed_population()
    torch.manual_seed(0)
    guide = AmortizedGuide(k=3, n_covariates=1, hidden=8).double()
    guide.fit_normalization(pop)
    torch.nn.init.normal_(guide.head[-1].weight)  # the output layer starts at zero
    loc, scale_tril = guide.encode(pop)
    alone_loc, alone_tril = guide.encode(pop.subset([1]))
    assert pop.subset([1]).obs_mask.shape[1] == 2 and loc.dtype == torch.float64
    assert torch.allclose(loc[1], alone_loc[0], atol=1e-6)
    assert torch.allclose(scale_tril[1], alone_tril[0], atol=1e-6)
    assert not torch.allclose(loc[0], loc[1], atol=1e-3)
    assert bool((torch.diagonal(scale_tril, dim1=-2, dim2=-1) > 0).all())
    assert torch.equal(scale_tril.triu(1), torch.zeros_like(scale_tril))


@pytest.mark.parametrize("target,residual_input", [("laplace", False), ("elbo", False),
                                                   ("laplace", True)])
def test_encoder_phase_moves_only_the_encoder_towards_the_exact_posterior(
    target, residual_input
):
    """At fixed parameters of the linear model (whose Laplace approximation is the exact
    posterior) the ELBO gap to the exact marginal likelihood shrinks; θ, Ω, σ stay bit for
    bit; simulated copies keep the design and the seed."""
    pop = random_slope_population(n=30)
    model = RandomSlopeModel()
    est = VariationalEstimator(
        model, guide="amortized", hidden=16, seed=3, residual_input=residual_input
    )
    est.setup(pop)
    exact = exact_loglik(model, pop)
    before = est.elbo_value(pop, particles=256)
    fixed = [p.detach().clone() for p in model.parameters()]
    data = est.encoder_population(pop, 5)
    assert len(data) == 6 * len(pop)
    assert torch.equal(data.obs_dv[: len(pop)], pop.obs_dv)
    assert torch.equal(data.obs_time[len(pop) :], pop.obs_time.repeat(5, 1))
    assert not torch.allclose(data.obs_dv[len(pop) : 2 * len(pop)], pop.obs_dv)
    assert torch.equal(data.obs_dv, est.encoder_population(pop, 5).obs_dv)
    losses = est.fit_encoder(data, steps=150, batch_subjects=60, lr=0.01, target=target)
    after = est.elbo_value(pop, particles=256)
    assert len(losses) == 150
    assert exact - after < 0.25 * (exact - before)
    assert after < exact
    for p, q in zip(model.parameters(), fixed, strict=True):
        assert torch.equal(p.detach(), q) and p.requires_grad


def test_residual_input_computed_once_equals_per_batch():
    """q(η) of a minibatch is the same from the population prediction of the whole
    population (what the encoder phase computes once) as from the batch's own."""
    pop = dosed_population()
    model = OneCmtOralModel()
    est = VariationalEstimator(model, guide="amortized", hidden=8, residual_input=True)
    est.setup(pop)
    torch.nn.init.normal_(est.guide.head[-1].weight)  # the output layer starts at zero
    index = torch.tensor([1])
    batch = SubjectBatch(index, pop.subset(index))
    loc, scale_tril = est.q(batch)
    cached_loc, cached_tril = est.q(batch, est.population_prediction(pop)[index][:, :2])
    assert torch.equal(loc, cached_loc) and torch.equal(scale_tril, cached_tril)
    # the residual is an input: another population prediction gives another q
    other_loc, _ = est.q(batch, 2.0 * est.population_prediction(pop)[index][:, :2])
    assert not torch.allclose(loc, other_loc, atol=1e-6)


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    loc_p, loc_q = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    tril_p = torch.randn(4, 3, 3, generator=g).tril(-1) + torch.diag_embed(
        torch.rand(4, 3, generator=g) + 0.5
    )
    tril_q = torch.randn(4, 3, 3, generator=g).tril(-1) + torch.diag_embed(
        torch.rand(4, 3, generator=g) + 0.5
    )
    expected = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(loc_p, scale_tril=tril_p),
        torch.distributions.MultivariateNormal(loc_q, scale_tril=tril_q),
    )
    assert torch.allclose(gaussian_kl(loc_p, tril_p, loc_q, tril_q), expected, atol=1e-10)
    with pytest.raises(ValueError, match="unknown encoder target 'flow'"):
        VariationalEstimator(RandomSlopeModel(), guide="amortized", encoder_target="flow")
