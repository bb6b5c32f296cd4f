"""Objective-function statistics of a fit: OFV (two conventions), AIC, BIC."""

from __future__ import annotations

import math

from deepnlme.model.domains import LOG_2PI


def objective_summary(loglik: float, n_parameters: int, n_obs: int) -> dict[str, float]:
    """``ofv`` = -2·loglik; ``ofv_nonmem`` = ofv - n_obs·log 2π (NONMEM drops that constant);
    ``aic`` = ofv + 2k; ``bic`` = ofv + k·log(n_obs), with k = ``n_parameters``."""
    ofv = -2.0 * loglik
    return {
        "ofv": ofv,
        "ofv_nonmem": ofv - n_obs * LOG_2PI,
        "aic": ofv + 2.0 * n_parameters,
        "bic": ofv + n_parameters * math.log(n_obs) if n_obs > 0 else float("nan"),
    }
