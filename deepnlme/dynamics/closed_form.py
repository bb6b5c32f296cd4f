r"""Closed-form linear compartment models (sums of exponentials), batched over subjects.

Every model is a *disposition* (central [+ peripheral] compartments) that answers a unit bolus
into core compartment ``i`` with the amount ``sum_m coef[i, m, j] · exp(-lam_m · t)`` in core
compartment ``j``, optionally preceded by a *depot* that feeds the central compartment with
first-order rate ``ka``. Only the disposition differs between models; the dose handling below
is written once.

Dose shapes. For an observation at time ``t`` and a dose with effective start ``t_d + lag``,
``s = t - t_d - lag``; ``T`` is the infusion duration (0 for a bolus), ``m = min(s, T)`` the
time infused so far, ``p = s - m`` the time since the end of the infusion and ``f = m / T``
(1 for a bolus) the fraction delivered. The response of one exponential ``e^{-λt}`` to the
dose, per unit amount, is

    B1(λ) = f · e^{-λp} · φ1(λm)  +  ss · e^{-λw} · φ1(λT) · σ(λ)

with ``φ1(x) = (1 - e^{-x}) / x``. The second term is the geometric series over the earlier
doses of a steady-state train: ``σ(λ) = 1 / (1 - e^{-λ·II})`` and ``w = s + II - T`` (time since
the end of the previous dose of the train). For a steady-state dose, observations between the
dose record and its lagged start see the earlier doses of the train (``s`` is wrapped into
``[0, II)``), as in NONMEM.

Depot. The depot -> central chain turns each exponential into the kernel
``(e^{-λt} - e^{-ka·t}) / (ka - λ)``, whose response is the divided difference
``B2 = (B1(λ) - B1(ka)) / (ka - λ)``. It is evaluated without cancellation (exactly also at
``ka == λ``) by the Leibniz rule for divided differences of the factors of ``B1``, each of
which has a cancellation-free divided difference between ``c = min(λ, ka)`` and
``c' = max(λ, ka)`` (``d = c' - c``)::

    ⟨e^{-λu}⟩ = u · e^{-cu} · φ1(du)
    ⟨φ1(λu)⟩ = u · φ2(cu, c'u)
    ⟨σ(λ)⟩   = σ(c) · σ(c') · II · e^{-c·II} · φ1(d·II)

where ``φ2(x, y) = (φ1(x) - φ1(y)) / (y - x)`` is the second divided difference of ``e^{-z}``
at ``0, x, y``. All terms are positive: no subtraction of nearly equal numbers. Small
arguments of ``φ1`` and ``φ2`` use Taylor series (thresholds chosen per dtype so that values
and derivatives are accurate to about machine precision).

Two-compartment dispositions use the macro constants ``α > β`` (assumed distinct, which holds
whenever ``q > 0``); ``β`` is computed as ``k10·k21/α`` to avoid cancellation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.dynamics.base import Dynamics
from deepnlme.dynamics.dosing import Doses, resolve_doses

__all__ = [
    "LinearCompartmentModel",
    "OneCmtIV",
    "OneCmtOral",
    "TwoCmtIV",
    "TwoCmtOral",
    "phi1",
    "phi2",
]


# ---------------------------------------------------------------------------- special functions
def _series_cut(dtype: torch.dtype) -> float:
    """Below this argument phi1/phi2 use their Taylor series (direct formulas lose digits)."""
    return 1e-2 if dtype == torch.float64 else 0.25


def phi1(x: Tensor) -> Tensor:
    """``φ1(x) = (1 - e^{-x}) / x`` elementwise for ``x >= 0``, with ``φ1(0) = 1``.

    Same shape as ``x``; accurate (with derivatives) down to and at ``x == 0``.
    """
    small = x < _series_cut(x.dtype)
    xs = torch.where(small, 1.0, x)
    direct = -torch.expm1(-xs) / xs
    z = torch.where(small, x, 0.0)
    series = 1 + z * (-1 / 2 + z * (1 / 6 + z * (-1 / 24 + z * (1 / 120 + z * (-1 / 720)))))
    return torch.where(small, series, direct)


def phi2(x: Tensor, y: Tensor) -> Tensor:
    """``φ2(x, y) = (φ1(x) - φ1(y)) / (y - x)`` for ``0 <= x <= y`` (``-φ1'(x)`` at ``x == y``).

    The second divided difference of ``e^{-z}`` at ``0, x, y``; it lies in ``(0, 1/2]``.
    Broadcasts ``x`` and ``y``; accurate for close and for small arguments.
    """
    small = y < _series_cut(y.dtype)
    ys = torch.where(small, 1.0, y)
    xs = torch.where(small, 0.0, x)
    direct = (phi1(xs) - torch.exp(-xs) * phi1(ys - xs)) / ys
    # series: sum_j (-1)^j h_j(x, y) / (j + 2)!, h_j the complete homogeneous polynomial
    xt = torch.where(small, x, 0.0)
    yt = torch.where(small, y, 0.0)
    h = torch.ones_like(yt)
    xp = torch.ones_like(xt)
    series = 0.5 * h
    factorial = 2.0
    for j in range(1, 6):
        xp = xp * xt
        h = yt * h + xp
        factorial *= j + 2
        series = series + ((-1) ** j / factorial) * h
    return torch.where(small, series, direct)


def _sigma(x: Tensor) -> Tensor:
    """``1 / (1 - e^{-x})`` for ``x > 0``: accumulation factor of a steady-state train."""
    return 1.0 / -torch.expm1(-x)


# ---------------------------------------------------------------------------- dose/obs pairs
class _Pairs(NamedTuple):
    """Every observation against every dose; tensors ``(N, T, D, 1)`` (last axis broadcasts
    over exponentials). Optional entries are None when no dose needs them."""

    active: Tensor  # bool, the dose acts on the observation
    s: Tensor  # time since the effective dose start (wrapped into the train for SS); 0 if inactive
    m: Tensor | None  # min(s, T): time infused so far (None: no infusions)
    p: Tensor | None  # s - m: time since the end of the infusion
    f: Tensor | None  # m / T: fraction delivered (1 for a bolus)
    dur: Tensor | None  # T, infusion duration
    ss: Tensor | None  # float 0/1, steady-state dose (None: no SS doses)
    ii: Tensor | None  # II (1 for non-SS doses)
    w: Tensor | None  # s + II - T: time since the end of the previous dose of the train


def _same_epoch(pop: Population, doses: Doses) -> Tensor:
    """``(N, T, D)`` bool: real observation, real dose, same reset epoch (timing aside)."""
    return (
        pop.obs_mask[:, :, None]
        & doses.mask[:, None, :]
        & (pop.obs_epoch[:, :, None] == doses.epoch[:, None, :])
    )


def _pairs(pop: Population, doses: Doses) -> _Pairs:
    t = pop.obs_time[:, :, None]
    tau = t - doses.time[:, None, :]  # (N, T, D)
    started = tau >= 0
    active = _same_epoch(pop, doses)
    flags = doses.flags
    if flags.ss:
        ss = doses.ss[:, None, :]
        ii = doses.ii[:, None, :]
        active = active & (started | (ss & (t >= doses.record_time[:, None, :])))
        s = torch.where(started, tau, torch.remainder(tau, ii))
    else:
        active = active & started
        s = tau
    s = torch.where(active, s, 0.0)[..., None]
    m = p = f = dur = ssf = iis = w = None
    if flags.infusion:
        dur = doses.duration[:, None, :, None]
        m = torch.minimum(s, dur)
        p = s - m
        is_inf = dur > 0
        f = torch.where(is_inf, m / torch.where(is_inf, dur, 1.0), 1.0)
    if flags.ss:
        ssb = doses.ss[:, None, :, None]
        ssf = ssb.to(s.dtype)
        iis = doses.ii[:, None, :, None]
        w = torch.where(ssb, s + iis - (0.0 if dur is None else dur), 0.0)
    return _Pairs(active, s, m, p, f, dur, ssf, iis, w)


class _Factors(NamedTuple):
    """Factors of B1 at each rate ``λ``; ``(N, T, D, M)`` or ``(N, 1, D, M)``; None if unused."""

    e_p: Tensor  # e^{-λp} (p = s without infusions)
    phi_m: Tensor | None  # φ1(λm)
    e_w: Tensor | None  # e^{-λw}
    sig: Tensor | None  # σ(λ) = 1 / (1 - e^{-λ·II})
    phi_T: Tensor | None  # φ1(λT)


def _factors(lam: Tensor, pr: _Pairs) -> _Factors:
    """Factors of B1 at rates ``lam`` ``(N, 1, 1, M)`` (1/time)."""
    e_p = torch.exp(-lam * (pr.s if pr.p is None else pr.p))
    phi_m = None if pr.m is None else phi1(lam * pr.m)
    e_w = sig = phi_t = None
    if pr.ss is not None:
        e_w = torch.exp(-lam * pr.w)
        sig = _sigma(lam * pr.ii)
        phi_t = None if pr.dur is None else phi1(lam * pr.dur)
    return _Factors(e_p, phi_m, e_w, sig, phi_t)


def _response(fa: _Factors, pr: _Pairs) -> Tensor:
    """B1: unit-amount response of ``e^{-λt}`` to each dose, ``(N, T, D, M)``."""
    out = fa.e_p if fa.phi_m is None else pr.f * fa.e_p * fa.phi_m
    if pr.ss is not None:
        train = fa.e_w * fa.sig
        if fa.phi_T is not None:
            train = train * fa.phi_T
        out = out + pr.ss * train
    return out


def _select(cond: Tensor, a: _Factors, b: _Factors, names: tuple[str, ...]) -> _Factors:
    """Elementwise ``a if cond else b`` for the factors ``names`` (others None)."""
    picked = {}
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        picked[name] = None if x is None else torch.where(cond, x, y)
    return _Factors(**{**dict.fromkeys(_Factors._fields), **picked})


def _chain_response(lam: Tensor, ka: Tensor, f_lam: _Factors, f_ka: _Factors, pr: _Pairs):
    """B2: unit-amount response of ``(e^{-lam·t} - e^{-ka·t}) / (ka - lam)`` to each dose.

    ``lam`` ``(N, 1, 1, M)``, ``ka`` ``(N, 1, 1, 1)`` (1/time), with the factors of B1 at
    both -> ``(N, T, D, M)`` (time units); exact without cancellation, also at ``ka == lam``.
    """
    lo_is_lam = lam <= ka
    c = torch.where(lo_is_lam, lam, ka)
    d = torch.where(lo_is_lam, ka, lam) - c
    lo = _select(lo_is_lam, f_lam, f_ka, ("e_p", "e_w", "sig", "phi_T"))  # at c = min(lam, ka)
    hi = _select(~lo_is_lam, f_lam, f_ka, ("phi_m", "sig", "phi_T"))  # at c' = max(lam, ka)
    if pr.m is None:
        out = pr.s * lo.e_p * phi1(d * pr.s)
    else:
        c2 = c + d
        out = pr.f * (
            pr.p * lo.e_p * phi1(d * pr.p) * hi.phi_m + lo.e_p * pr.m * phi2(c * pr.m, c2 * pr.m)
        )
    if pr.ss is not None:
        ii = pr.ii
        d_sig = lo.sig * hi.sig * ii * torch.exp(-c * ii) * phi1(d * ii)
        d_ew = pr.w * lo.e_w * phi1(d * pr.w)
        if pr.dur is None:
            train = d_ew * hi.sig + lo.e_w * d_sig
        else:
            T = pr.dur
            train = (
                d_ew * hi.phi_T * hi.sig
                + lo.e_w * T * phi2(c * T, (c + d) * T) * hi.sig
                + lo.e_w * lo.phi_T * d_sig
            )
        out = out + pr.ss * train
    return out


# ---------------------------------------------------------------------------- models
def _param(indiv: Mapping[str, Tensor], name: str) -> Tensor:
    """Individual parameter ``name`` as an ``(N,)`` (or 0-dim) tensor."""
    value = indiv[name]
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


class LinearCompartmentModel(Dynamics):
    """Closed-form linear model: a disposition (:meth:`disposition`), optionally after a depot.

    Subclasses set ``compartments`` (depot first when ``depot`` is True, then central, then
    peripheral), ``required`` and the defaults, and implement :meth:`disposition` and
    :meth:`core_matrix`. :meth:`forward` returns amounts ``(N, T, n_compartments)`` at
    ``pop.obs_time`` for every compartment.
    """

    depot: bool = False  # the first compartment absorbs into the second with rate ka

    def disposition(self, indiv: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Exponential rates ``lam`` ``(N, M)`` (1/time) and coefficients ``coef``
        ``(N, Cc, M, Cc)``: a unit bolus into core compartment ``i`` leaves
        ``sum_m coef[:, i, m, j] · exp(-lam[:, m] · t)`` in core compartment ``j``."""
        raise NotImplementedError

    def core_matrix(self, indiv: Mapping[str, Tensor]) -> Tensor:
        """Rate matrix ``(N, Cc, Cc)`` (1/time) of the disposition: ``dA/dt = K A``."""
        raise NotImplementedError

    def rate_matrix(self, indiv: Mapping[str, Tensor]) -> Tensor:
        """Rate matrix ``(N, C, C)`` of the whole model (depot included), ``dA/dt = K A``."""
        core = self.core_matrix(indiv)
        if not self.depot:
            return core
        ka = _param(indiv, "ka").reshape(-1)
        n, cc = core.shape[0], core.shape[-1]
        k = core.new_zeros(max(n, ka.shape[0]), cc + 1, cc + 1)
        k[:, 1:, 1:] = core
        k[:, 0, 0] = -ka
        k[:, 1, 0] = ka
        return k

    def forward(self, indiv: dict[str, Tensor], pop: Population) -> Tensor:
        """Amounts ``(N, T, n_compartments)`` at ``pop.obs_time`` (0 in padding slots)."""
        self.check_params(indiv)
        doses = resolve_doses(indiv, pop, self.compartments, self.default_dose_cmt)
        fast = self._bolus_only(indiv, pop, doses, self.compartments)
        if fast is not None:
            return torch.stack([fast[n] for n in self.compartments], -1)
        return self._superposition(indiv, pop, doses)

    def amounts(
        self, indiv: dict[str, Tensor], pop: Population, names: Sequence[str]
    ) -> dict[str, Tensor]:
        """Amounts ``(N, T)`` by name; with bolus-only dosing just the compartments ``names``."""
        self.check_params(indiv)
        doses = resolve_doses(indiv, pop, self.compartments, self.default_dose_cmt)
        fast = self._bolus_only(indiv, pop, doses, names)
        if fast is not None:
            return fast
        full = self._superposition(indiv, pop, doses)
        return {n: full[..., j] for j, n in enumerate(self.compartments)}

    def _bolus_only(
        self, indiv: Mapping[str, Tensor], pop: Population, doses: Doses, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        if doses.flags.infusion or doses.flags.ss:
            return None
        return self.bolus_amounts(indiv, pop, doses, names)

    def _superposition(self, indiv: Mapping[str, Tensor], pop: Population, doses: Doses) -> Tensor:
        """Amounts ``(N, T, n_compartments)`` by the general dose-response formulas."""
        pr = _pairs(pop, doses)
        lam, coef = self.disposition(indiv)
        n_exp = lam.shape[-1]
        lam4 = lam[:, None, None, :]
        if self.depot:
            ka = _param(indiv, "ka").reshape(-1)
            ka4 = ka.reshape(-1, 1, 1, 1)
            fa = _factors(torch.cat([lam4, ka4.expand_as(lam4[..., :1])], -1), pr)
            f_lam = _Factors(*(None if x is None else x[..., :n_exp] for x in fa))
            f_ka = _Factors(*(None if x is None else x[..., n_exp:] for x in fa))
            basis = [_response(fa, pr), _chain_response(lam4, ka4, f_lam, f_ka, pr)]
            n, cc = coef.shape[0], coef.shape[1]
            # weights (N, C_in, K, C_out) over the basis [B1(lam), B1(ka), B2(lam, ka)]
            w = coef.new_zeros(n, cc + 1, 2 * n_exp + 1, cc + 1)
            w[:, 1:, :n_exp, 1:] = coef
            w[:, 0, n_exp, 0] = 1.0
            w[:, 0, n_exp + 1 :, 1:] = ka.reshape(-1, 1, 1) * coef[:, 0]
        else:
            basis = [_response(_factors(lam4, pr), pr)]
            w = coef
        b = torch.cat(basis, dim=-1) if len(basis) > 1 else basis[0]
        b = torch.where(pr.active[..., None], b, 0.0)  # (N, T, D, K)
        n, d = doses.cmt.shape
        idx = doses.cmt[:, :, None, None].expand(n, d, *w.shape[2:])
        w_dose = torch.gather(w.expand(n, *w.shape[1:]), 1, idx)  # (N, D, K, C)
        w_dose = w_dose * doses.amount[..., None, None]
        return torch.einsum("ntdk,ndkc->ntc", b, w_dose)


    def bolus_amounts(
        self, indiv: Mapping[str, Tensor], pop: Population, doses: Doses, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        """Amounts ``(N, T)`` of (at least) the compartments ``names`` for bolus-only dosing by
        a shorter formula, or None where not provided.

        Subclasses may override it: the fitting loops differentiate the dynamics up to third
        order, so fewer operations in the common case pay off several times.
        """
        return None


def _bolus_pairs(pop: Population, doses: Doses) -> tuple[Tensor, Tensor]:
    """Time since each bolus ``(N, T, D)`` (0 where the dose does not act) and the
    dose amounts where it acts ``(N, T, D)`` (0 elsewhere)."""
    s = pop.obs_time[:, :, None] - doses.time[:, None, :]
    active = _same_epoch(pop, doses) & (s >= 0)
    s = torch.where(active, s, 0.0)
    return s, torch.where(active, doses.amount[:, None, :], 0.0)


class _OneCmt(LinearCompartmentModel):
    @staticmethod
    def _k(indiv: Mapping[str, Tensor]) -> Tensor:
        """Elimination rate ``cl / v`` (1/time), ``(N,)``."""
        return (_param(indiv, "cl") / _param(indiv, "v")).reshape(-1)

    def disposition(self, indiv):
        k = self._k(indiv)[:, None]
        return k, torch.ones_like(k)[:, None, :, None]

    def core_matrix(self, indiv):
        return -self._k(indiv).reshape(-1, 1, 1)


class _TwoCmt(LinearCompartmentModel):
    @staticmethod
    def _micro(indiv: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        v = _param(indiv, "v")
        q = _param(indiv, "q")
        k10 = (_param(indiv, "cl") / v).reshape(-1)
        k12 = (q / v).reshape(-1)
        k21 = (q / _param(indiv, "vp")).reshape(-1)
        return k10, k12, k21

    def disposition(self, indiv):
        k10, k12, k21 = self._micro(indiv)
        root = torch.sqrt((k10 + k12 - k21) ** 2 + 4 * k12 * k21)  # alpha - beta > 0
        alpha = 0.5 * (k10 + k12 + k21 + root)
        beta = k10 * k21 / alpha
        lam = torch.stack([alpha, beta], dim=-1)
        cc = torch.stack([alpha - k21, k21 - beta], dim=-1) / root[:, None]
        cp = torch.stack([-k12, k12], dim=-1) / root[:, None]
        pc = torch.stack([-k21, k21], dim=-1) / root[:, None]
        pp = torch.stack([alpha - k10 - k12, k10 + k12 - beta], dim=-1) / root[:, None]
        coef = torch.stack([torch.stack([cc, cp], -1), torch.stack([pc, pp], -1)], 1)
        return lam, coef  # coef (N, 2, 2, 2): [from, exponential, to]

    def core_matrix(self, indiv):
        k10, k12, k21 = self._micro(indiv)
        row0 = torch.stack([-(k10 + k12), k21], -1)
        row1 = torch.stack([k12, -k21], -1)
        return torch.stack([row0, row1], -2)


class OneCmtIV(_OneCmt):
    """One compartment, IV doses: ``dA/dt = -(cl/v)·A``. Parameters cl (volume/time), v."""

    compartments = ("central",)
    required = ("cl", "v")
    default_dose_cmt = 1
    default_obs_cmt = 1

    def bolus_amounts(self, indiv, pop, doses, names):
        """``central(t) = Σ_d amt_d · e^{-k (t - t_d)}``, ``(N, T)``."""
        k = self._k(indiv).reshape(-1, 1, 1)
        s, amt = _bolus_pairs(pop, doses)
        return {"central": (amt * torch.exp(-k * s)).sum(-1)}


class OneCmtOral(_OneCmt):
    """One compartment with first-order absorption (ka, 1/time) from a depot.

    Doses default to the depot (CMT 1); CMT 2 doses go straight into central.
    """

    compartments = ("depot", "central")
    required = ("ka", "cl", "v")
    depot = True
    default_dose_cmt = 1
    default_obs_cmt = 2

    #: the textbook formula is used while |ka - k| > this · max(ka, k) for every subject
    #: (its rounding error grows like eps / relative gap); closer rates take the general path.
    min_relative_gap = 1e-4

    def bolus_amounts(self, indiv, pop, doses, names):
        """Depot ``Σ amt·e^{-ka s}``; central ``Σ amt·ka/(ka-k)·(e^{-k s} - e^{-ka s})`` for
        depot doses and ``Σ amt·e^{-k s}`` for doses into central, each ``(N, T)``."""
        ka = _param(indiv, "ka").reshape(-1, 1, 1)
        k = self._k(indiv).reshape(-1, 1, 1)
        gap = ka - k
        if not bool((gap.abs() > self.min_relative_gap * torch.maximum(ka, k)).all()):
            return None
        s, amt = _bolus_pairs(pop, doses)
        e_a = torch.exp(-ka * s)
        into_depot = doses.cmt == 0  # (N, D)
        out = {}
        if "depot" in names:
            out["depot"] = (torch.where(into_depot[:, None, :], amt, 0.0) * e_a).sum(-1)
        if "central" in names:
            e_k = torch.exp(-k * s)
            chain = ka / gap * (e_k - e_a)
            if doses.flags.max_cmt <= 1:  # the usual case: every dose into the depot
                central = chain
            else:
                central = torch.where(into_depot[:, None, :], chain, e_k)
            out["central"] = (amt * central).sum(-1)
        return out


class TwoCmtIV(_TwoCmt):
    """Two compartments (central, peripheral): parameters cl, v, q (volume/time), vp."""

    compartments = ("central", "peripheral")
    required = ("cl", "v", "q", "vp")
    default_dose_cmt = 1
    default_obs_cmt = 1


class TwoCmtOral(_TwoCmt):
    """Two compartments with first-order absorption (ka) from a depot; defaults: dose into
    the depot (CMT 1), observe central (CMT 2)."""

    compartments = ("depot", "central", "peripheral")
    required = ("ka", "cl", "v", "q", "vp")
    depot = True
    default_dose_cmt = 1
    default_obs_cmt = 2
