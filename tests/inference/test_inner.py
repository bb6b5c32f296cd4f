"""Inner mode-finding pieces: positive-definite Hessian repair and log-determinants."""

import torch

from deepnlme.inference.inner import absolute_eigenvalues
from deepnlme.inference.laplace import _logdet


def test_absolute_eigenvalues_keeps_pd_and_flips_negative():
    pd = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    out = absolute_eigenvalues(torch.stack([pd, indefinite]))
    assert torch.allclose(out[0], pd)
    assert torch.allclose(out[1], torch.diag(torch.tensor([1.0, 3.0])))


def test_absolute_eigenvalues_survives_non_finite_and_extreme_entries():
    bad = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    huge = torch.tensor([[1e300, 1e300], [1e300, -1e300]])
    out = absolute_eigenvalues(torch.stack([bad, huge]))
    assert torch.equal(out[0], torch.eye(2))
    assert torch.isfinite(out[1]).all()
    assert (torch.linalg.eigvalsh(out[1]) > 0).all()


def test_logdet_is_log_abs_det_where_not_positive_definite():
    pd = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    got = _logdet(torch.stack([pd, indefinite]))
    assert torch.allclose(
        got, torch.tensor([torch.logdet(pd).item(), torch.log(torch.tensor(3.0)).item()])
    )
