"""Marginal-likelihood gradients (implicit differentiation through η̂) equal finite differences."""

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference import FOCE, FOCEI, InnerOptions, Laplace
from deepnlme.model.zoo.pk import OneCmtOralModel, PhenoModel

TIGHT = {"gtol": 1e-11, "max_iter": 200}


def finite_difference_check(est, pop, h: float = 1e-5, rtol: float = 1e-5):
    params = [p for p in est.model.parameters() if p.requires_grad]
    est.reset()
    loss = est.loss(pop)
    grads = torch.autograd.grad(loss, params)
    for param, grad in zip(params, grads, strict=False):
        flat = param.data.view(-1)
        for j in range(flat.numel()):
            old = float(flat[j])
            flat[j] = old + h
            est.reset()
            up = float(est.loss(pop))
            flat[j] = old - h
            est.reset()
            down = float(est.loss(pop))
            flat[j] = old
            fd = (up - down) / (2 * h)
            assert float(grad.view(-1)[j]) == pytest.approx(fd, rel=rtol, abs=1e-6)


@pytest.mark.parametrize("method", [Laplace, FOCEI])
def test_theophylline_gradient(method):
    pop = load_dataset("theophylline").subset(list(range(6)))
    model = OneCmtOralModel(
        error="combined",
        init={"tvka": 1.2, "tvcl": 0.05, "tvv": 0.5, "omega": [0.3, 0.1, 0.05]},
    )
    finite_difference_check(method(model, inner=TIGHT), pop)


@pytest.mark.parametrize("method", [FOCEI, FOCE, Laplace])
def test_pheno_gradient(method):
    pop = load_dataset("phenobarbital").subset(list(range(15)))
    finite_difference_check(method(PhenoModel(), inner=InnerOptions(**TIGHT)), pop)
