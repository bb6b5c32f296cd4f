"""NPD/NPDE: N(0, 1) for data simulated from the model itself (within sampling error), and
visibly not when the model's residual error is wrong."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from deepnlme.diagnostics.npde import npde, simulate_dv
from deepnlme.model.zoo.pk import OneCmtOralModel
from tests.diagnostics.conftest import THEO_ESTIMATES


@pytest.fixture(scope="module")
def simulated_theo(theo):
    """The Theophylline design 20 times over (240 subjects), DV simulated from the fit."""
    model, _, pop, _ = theo
    big = pop.subset(torch.arange(len(pop)).repeat(20))
    dv = simulate_dv(model, big, 1, torch.Generator().manual_seed(7))[0]
    return dataclasses.replace(big, obs_dv=torch.where(big.obs_mask, dv, torch.zeros_like(dv)))


def moments(values: torch.Tensor) -> tuple[float, float, int]:
    return float(values.mean()), float(values.var()), values.numel()


def test_npde_of_data_from_the_model_are_standard_normal(theo, simulated_theo):
    model, _, _, _ = theo
    pop = simulated_theo
    res = npde(model, pop, 300, torch.Generator().manual_seed(11))
    for values in (res.npde[pop.obs_mask], res.npd[pop.obs_mask]):
        mean, var, n = moments(values)
        assert n == 2640
        assert abs(mean) < 3 / math.sqrt(n) * 2  # NPD are correlated within subjects: wider
        assert abs(var - 1) < 4 * math.sqrt(2 / n)
    # NPDE decorrelate: within a subject, successive values are nearly uncorrelated
    v = torch.where(pop.obs_mask, res.npde, torch.zeros_like(res.npde))
    lag = (v[:, 1:] * v[:, :-1])[pop.obs_mask[:, 1:] & pop.obs_mask[:, :-1]].mean()
    assert abs(float(lag)) < 0.1


def test_npde_detect_a_wrong_residual_error(simulated_theo):
    pop = simulated_theo
    wrong = OneCmtOralModel(init={**THEO_ESTIMATES, "sigma_add": 0.35})  # half the true SD
    res = npde(wrong, pop, 300, torch.Generator().manual_seed(11))
    _, var, _ = moments(res.npde[pop.obs_mask])
    assert var > 1.5


def test_npde_shapes_and_padding(pheno):
    model, _, pop, _ = pheno
    res = npde(model, pop, 50, torch.Generator().manual_seed(0))
    assert res.simulated.shape == (50, *pop.obs_mask.shape)
    assert (res.npde[~pop.obs_mask] == 0).all() and torch.isfinite(res.npde[pop.obs_mask]).all()
    with pytest.raises(ValueError, match="must be >= 1"):
        npde(model, pop, 0)
