"""Result of a formula-model fit: estimates with lme4's names, conditional modes, checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepnlme.mixed.design import MixedDesign


@dataclass
class ConditionalModes:
    """Conditional modes of one random term: ``mode`` and ``sd`` ``(n_levels, p_k)``."""

    group: str
    names: list[str]
    levels: list[str]
    mode: np.ndarray
    sd: np.ndarray


@dataclass
class MixedFit:
    """A fitted formula model.

    ``covariances[k]`` is term k's random-effect covariance ``(p_k, p_k)`` on the natural
    scale; ``sigma`` the residual SD (Gaussian) or None.
    """

    family: str
    link: str
    method: str
    n_obs: int
    loglik: float
    n_params: int
    fixef: dict[str, float]
    se_fixef: dict[str, float]
    covariances: list[np.ndarray]
    sigma: float | None
    theta: np.ndarray
    modes: list[ConditionalModes]
    converged: bool
    grad_max: float
    n_iter: int
    n_eval: int
    message: str
    thresholds: list[float] | None = None
    se_thresholds: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def deviance(self) -> float:
        return -2.0 * self.loglik

    @property
    def aic(self) -> float:
        return self.deviance + 2 * self.n_params

    @property
    def bic(self) -> float:
        return self.deviance + math.log(self.n_obs) * self.n_params

    def varcorr(self) -> dict[str, Any]:
        """lme4's ``VarCorr``: per grouping factor names, var, sd, corr; and ``Residual``."""
        out: dict[str, Any] = {}
        for cov, m in zip(self.covariances, self.modes, strict=True):
            sd = np.sqrt(np.diag(cov))
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = cov / np.outer(sd, sd)
            corr = np.where(np.isfinite(corr), corr, 0.0)
            np.fill_diagonal(corr, 1.0)
            key, i = m.group, 1
            while key in out:
                key, i = f"{m.group}.{i}", i + 1
            out[key] = {
                "names": list(m.names), "var": np.diag(cov).tolist(), "sd": sd.tolist(),
                "corr": corr.tolist(),
            }
        if self.sigma is not None:
            out["Residual"] = {"var": [self.sigma**2], "sd": [self.sigma]}
        return out

    def summary(self) -> dict[str, Any]:
        """The results.json entries of the fit (contract keys)."""
        out = {
            "family": self.family, "link": self.link, "n_obs": self.n_obs,
            "loglik": self.loglik, "deviance": self.deviance, "aic": self.aic, "bic": self.bic,
            "n_params": self.n_params, "converged": self.converged, "grad_max": self.grad_max,
            "n_iter": self.n_iter, "n_eval": self.n_eval, "optimizer_message": self.message,
            "fixef": self.fixef, "se_fixef": self.se_fixef, "varcorr": self.varcorr(),
            "theta": self.theta.tolist(),
        }
        if self.thresholds is not None:
            out["thresholds"] = self.thresholds
            out["se_thresholds"] = self.se_thresholds or [float("nan")] * len(self.thresholds)
        out.update(self.extra)
        return out


    def coefficients(self) -> list[dict[str, Any]]:
        """The coefficient table (lme4's / clmm's ``summary``): one row per fixed effect, then
        per threshold (``j|j+1`` between categories), with estimate, standard error, z value
        and two-sided p-value (NaN where there is no standard error)."""
        rows = [("fixef", n, v, self.se_fixef.get(n, math.nan)) for n, v in self.fixef.items()]
        if self.thresholds is not None:
            cats = self.extra.get("categories") or list(range(1, len(self.thresholds) + 2))
            se = self.se_thresholds or [math.nan] * len(self.thresholds)
            rows += [
                ("threshold", f"{_label(cats[j])}|{_label(cats[j + 1])}", a, s)
                for j, (a, s) in enumerate(zip(self.thresholds, se, strict=True))
            ]
        out = []
        for kind, name, est, se_ in rows:
            z = est / se_ if se_ and math.isfinite(se_) and se_ > 0 else math.nan
            p = math.erfc(abs(z) / math.sqrt(2)) if math.isfinite(z) else math.nan
            out.append({"term": name, "kind": kind, "estimate": est, "std_error": se_,
                        "z_value": z, "p_value": p})
        return out


def _label(value: Any) -> str:
    """A category value as clmm prints it (``1``, not ``1.0``)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def conditional_modes(
    design: MixedDesign, b: list[torch.Tensor], var_b: list[torch.Tensor]
) -> list[ConditionalModes]:
    """Package per-term modes ``(n_k, p_k)`` and conditional variances ``(n_k, p_k)``."""
    return [
        ConditionalModes(
            t.group, list(t.names), list(t.levels), bk.detach().cpu().numpy(),
            np.sqrt(np.clip(vk.detach().cpu().numpy(), 0.0, None)),
        )
        for t, bk, vk in zip(design.terms, b, var_b, strict=True)
    ]
