"""The blocked Cholesky of Λ'Z'WZΛ + I against the dense matrix built explicitly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from deepnlme.mixed.covariance import RelativeCovariance
from deepnlme.mixed.design import build_design
from deepnlme.mixed.formula import parse_formula
from deepnlme.mixed.random_effects import RandomDesign


def crossed_design():
    rng = np.random.default_rng(1)
    n = 300
    t = pd.DataFrame({
        "y": rng.normal(size=n), "x": rng.normal(size=n),
        "a": rng.integers(0, 40, n), "b": rng.integers(0, 12, n), "c": rng.integers(0, 5, n),
    })
    return build_design(t, parse_formula("y ~ x + (x|a) + (x|b) + (1|c)"), "t")


def dense_z_lambda(rd: RandomDesign, factors):
    cols = []
    for t, v in zip(rd.terms, rd.row_values(factors), strict=True):
        z = torch.zeros(len(t.index), t.n_levels, t.size, dtype=torch.float64)
        z[torch.arange(len(t.index)), t.index] = v
        cols.append(z.reshape(len(t.index), -1))
    return torch.cat(cols, dim=1)


def test_blocked_factor_matches_dense_logdet_solve_and_inverse():
    d = crossed_design()
    rd = RandomDesign(d)
    cov = RelativeCovariance(rd.sizes)
    theta = torch.as_tensor(np.random.default_rng(2).uniform(0.3, 1.5, cov.n_theta))
    factors = cov.factors(theta)
    w = torch.as_tensor(np.random.default_rng(3).uniform(0.2, 2.0, d.n_obs))
    factor = rd.factorize(factors, w)
    ZL = dense_z_lambda(rd, factors)
    H = ZL.T @ (w[:, None] * ZL) + torch.eye(ZL.shape[1], dtype=torch.float64)
    torch.testing.assert_close(factor.logdet_random(), torch.logdet(H), rtol=1e-10, atol=1e-9)
    rhs = [torch.randn(t.n_levels, t.size, dtype=torch.float64) for t in rd.terms]
    x = torch.cat([xk.reshape(-1) for xk in rd.solve(factor, rhs)])
    expected = torch.linalg.solve(H, torch.cat([r.reshape(-1) for r in rhs]))
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-10)
    Hinv = torch.linalg.inv(H)
    start = 0
    for t, blocks in zip(rd.terms, rd.conditional_variances(factor), strict=True):
        p = t.size
        for level in range(t.n_levels):
            expected_block = Hinv[start : start + p, start : start + p]
            torch.testing.assert_close(blocks[level], expected_block, rtol=1e-9, atol=1e-10)
            start += p
