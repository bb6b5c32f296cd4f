"""Monte Carlo EM with a Hamiltonian Monte Carlo E-step (the TFP InstEval tutorial's algorithm),
written against a generic ``log_joint(latents, batch)`` so that any model with continuous
latents (formula mixed models, NLME models) can use it.

Each iteration runs one HMC transition of the latents at the current parameters (E-step, a
single posterior sample) and one Adam step on the parameters maximising ``log_joint`` at that
sample (M-step: by Fisher's identity its expectation is the gradient of the marginal
log-likelihood). During warm-up the leapfrog step size is tuned to a target acceptance rate
and a diagonal mass matrix is set from the latents' sample variances; after warm-up the
parameters (Polyak) and the latents' moments are averaged over the last iterations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MCEMOptions:
    """Iterations, HMC settings (``n_leapfrog`` steps of initial size ``step_size``), Adam
    learning rate, warm-up share (step-size and mass adaptation), the final share of
    iterations over which parameters and latents are averaged, and seed."""

    n_iter: int = 2000
    n_leapfrog: int = 10
    step_size: float = 0.01
    target_accept: float = 0.75
    lr: float = 0.02
    warmup_fraction: float = 0.3
    average_fraction: float = 0.5
    seed: int = 0


@dataclass
class MCEMResult:
    """Averaged parameters (same order as given), latents' posterior mean and SD ``(D,)``,
    mean acceptance rate after warm-up, final step size, ``-log_joint`` trace, seconds."""

    params: list[torch.Tensor]
    latent_mean: torch.Tensor
    latent_sd: torch.Tensor
    accept_rate: float
    step_size: float
    trace: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _log_prob_and_grad(
    log_joint: Callable[[torch.Tensor, Any], torch.Tensor], x: torch.Tensor, batch: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    value = log_joint(x, batch)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def hmc_transition(
    log_joint: Callable[[torch.Tensor, Any], torch.Tensor],
    x: torch.Tensor,
    batch: Any,
    step_size: float,
    inv_mass: torch.Tensor,
    n_leapfrog: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """One HMC transition from ``x`` ``(D,)`` (diagonal mass ``1/inv_mass``); returns the new
    state and the acceptance probability."""
    lp0, g = _log_prob_and_grad(log_joint, x, batch)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    p0 = noise / torch.sqrt(inv_mass)
    p = p0 + 0.5 * step_size * g
    xn = x.detach().clone()
    for i in range(n_leapfrog):
        xn = xn + step_size * inv_mass * p
        lp, g = _log_prob_and_grad(log_joint, xn, batch)
        p = p + (step_size if i < n_leapfrog - 1 else 0.5 * step_size) * g
    h0 = -lp0 + 0.5 * (p0 * p0 * inv_mass).sum()
    h1 = -lp + 0.5 * (p * p * inv_mass).sum()
    log_accept = float(h0 - h1)
    if not math.isfinite(log_accept):  # a diverging trajectory (NaN or infinite energy)
        return x.detach(), 0.0
    accept = 1.0 if log_accept >= 0 else math.exp(log_accept)
    if torch.rand((), generator=generator) >= accept:
        return x.detach(), accept
    return xn, accept


def mcem(
    log_joint: Callable[[torch.Tensor, Any], torch.Tensor],
    latents: torch.Tensor,
    params: Sequence[torch.Tensor],
    batch: Any = None,
    options: MCEMOptions | None = None,
    callback: Callable[[int, float], None] | None = None,
    recenter: Callable[[torch.Tensor], torch.Tensor] | None = None,
    closed_form: Callable[[torch.Tensor, float, bool], None] | None = None,
) -> MCEMResult:
    """Fit ``params`` (leaf tensors with ``requires_grad``) by MCEM-HMC.

    Args:
        log_joint: ``(latents (D,), batch) -> log p(y, latents | params)`` (scalar).
        latents: ``(D,)`` initial latents.
        params: the parameters ``log_joint`` reads (updated in place; averaged values are
            returned in the result).
        batch: passed through to ``log_joint``.
        recenter: optional parameter-expansion step (PX-EM) applied to each sample before the
            M-step: moves the latents along a direction the likelihood does not see (e.g. the
            mean of a grouping factor's intercepts) into the fixed effects, updating the
            parameters in place, and returns the moved latents. Same fixed point as EM, much
            faster where the prior alone pins that direction.
        closed_form: optional closed-form part of the M-step, called after each E-step (and
            ``recenter``) as ``closed_form(sample, gamma, warming_up)``: updates in place the
            parameters it owns (not in ``params``) from sufficient statistics smoothed with
            weight ``gamma`` — 1 until the averaging share, then 1/m for its m-th iteration
            (the statistics become the average over that share's samples).
    """
    opts = options or MCEMOptions()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(opts.seed)
    optimizer = torch.optim.Adam(list(params), lr=opts.lr) if params else None
    x = latents.detach().clone()
    inv_mass = torch.ones_like(x)
    step = opts.step_size
    warmup = int(opts.warmup_fraction * opts.n_iter)
    windows = {max(1, warmup // 3), warmup}
    average_from = max(warmup, int((1 - opts.average_fraction) * opts.n_iter))
    w_n, w_mean, w_m2 = 0, torch.zeros_like(x), torch.zeros_like(x)
    avg = [torch.zeros_like(p) for p in params]
    s_n, s_mean, s_m2 = 0, torch.zeros_like(x), torch.zeros_like(x)
    accepts, trace = [], []
    for it in range(opts.n_iter):
        x, accept = hmc_transition(log_joint, x, batch, step, inv_mass, opts.n_leapfrog, generator)
        if recenter is not None:
            with torch.no_grad():
                x = recenter(x)
        if closed_form is not None:
            gamma = 1.0 if it < average_from else 1.0 / (it - average_from + 1)
            with torch.no_grad():
                closed_form(x, gamma, it < warmup)
        if optimizer is None:
            with torch.no_grad():
                loss = -log_joint(x, batch)
        else:
            optimizer.zero_grad()
            loss = -log_joint(x, batch)
            loss.backward()
            optimizer.step()
        trace.append(float(loss.detach()))
        if callback is not None:
            callback(it, trace[-1])
        if it < warmup:
            step *= float(torch.exp(torch.tensor(0.1 * (accept - opts.target_accept))))
            w_n += 1
            delta = x - w_mean
            w_mean = w_mean + delta / w_n
            w_m2 = w_m2 + delta * (x - w_mean)
            if it + 1 in windows and w_n > 10:
                var = w_m2 / (w_n - 1)
                inv_mass = (w_n * var + 1e-3 * var.mean()) / (w_n + 5)
                w_n, w_mean, w_m2 = 0, torch.zeros_like(x), torch.zeros_like(x)
            continue
        accepts.append(accept)
        if it < average_from:
            continue
        s_n += 1
        with torch.no_grad():
            for a, p in zip(avg, params, strict=True):
                a += (p.detach() - a) / s_n
        delta = x - s_mean
        s_mean = s_mean + delta / s_n
        s_m2 = s_m2 + delta * (x - s_mean)
    sd = torch.sqrt(s_m2 / max(s_n - 1, 1))
    return MCEMResult(
        avg,
        s_mean,
        sd,
        sum(accepts) / max(len(accepts), 1),
        step,
        trace,
        time.perf_counter() - start,
    )
