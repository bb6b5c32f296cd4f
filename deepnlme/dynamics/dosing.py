"""Dose handling shared by the closed-form and ODE dynamics.

:func:`resolve_doses` applies the optional individual parameters (bioavailability, lag time,
modelled infusion rate or duration) to the dose records of a
:class:`~deepnlme.data.population.Population` and returns a :class:`Doses` table of
``(N, D)`` tensors. The semantics follow NONMEM:

* ``F`` (``bioav`` / ``bioav_<cmt name>``) scales the amount of every dose.
  For an infusion with a RATE given in the data (RATE > 0) the rate is kept and the
  duration becomes ``F·AMT/RATE`` (= ``F · dose_duration``); with RATE = -1 the rate is
  ``indiv["rate"]`` and the duration ``F·AMT/rate``; with RATE = -2 the duration is
  ``indiv["duration"]`` and the rate ``F·AMT/duration``.
* The lag time (``lag`` / ``lag_<cmt name>``) shifts the start of the dose (bolus or infusion).
* Steady-state doses (SS = 1 or 2) are the last dose of an infinite train of identical doses
  (same amount, F, lag and duration) every II; resets (SS = 1, EVID 3/4) are already encoded
  in the epochs by the data layer, so SS = 1 and SS = 2 behave the same in the dynamics.
  Infusions must not be longer than II.
* A dose acts on an observation of the same epoch from its lagged start ``time + lag`` on
  (an observation at exactly that time sees it). A steady-state dose acts from its record
  time on: between the record time and the lagged start the earlier doses of its train are
  present (as in NONMEM; this matters for troughs sampled at the SS dose record with ALAG).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from deepnlme.data.population import (
    RATE_MODELLED_DURATION,
    RATE_MODELLED_RATE,
    Population,
)


@dataclass(frozen=True)
class DoseFlags:
    """Static facts about a population's real doses (decide which code paths run)."""

    infusion: bool  # some dose is an infusion (RATE != 0)
    ss: bool  # some dose is a steady-state dose (SS 1 or 2)
    modelled_rate: bool  # some dose has RATE = -1
    modelled_duration: bool  # some dose has RATE = -2
    max_cmt: int  # largest CMT dosed into (0 if all use the default)
    min_cmt: int  # smallest CMT dosed into
    bad_ii: bool  # some steady-state dose has II <= 0


_FLAG_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def dose_flags(pop: Population) -> DoseFlags:
    """:class:`DoseFlags` of ``pop`` (one host-device sync, cached per dose tensors)."""
    tensors = (pop.dose_mask, pop.dose_rate, pop.dose_cmt, pop.dose_ss, pop.dose_ii)
    hit = _FLAG_CACHE.get(pop.dose_mask)
    if hit is not None:
        refs, versions, flags = hit
        if all(
            r() is t and t._version == v for r, t, v in zip(refs, tensors, versions, strict=True)
        ):
            return flags
    mask = pop.dose_mask
    rate = pop.dose_rate
    ss = mask & (pop.dose_ss > 0)
    cmt = torch.where(mask, pop.dose_cmt, 0)
    values = torch.stack(
        [
            (mask & (rate != 0)).any().to(torch.long),
            ss.any().to(torch.long),
            (mask & (rate == RATE_MODELLED_RATE)).any().to(torch.long),
            (mask & (rate == RATE_MODELLED_DURATION)).any().to(torch.long),
            cmt.max() if cmt.numel() else cmt.new_zeros(()),
            cmt.min() if cmt.numel() else cmt.new_zeros(()),
            (ss & (pop.dose_ii <= 0)).any().to(torch.long),
        ]
    ).tolist()
    flags = DoseFlags(
        infusion=bool(values[0]),
        ss=bool(values[1]),
        modelled_rate=bool(values[2]),
        modelled_duration=bool(values[3]),
        max_cmt=int(values[4]),
        min_cmt=int(values[5]),
        bad_ii=bool(values[6]),
    )
    refs = tuple(weakref.ref(t) for t in tensors)
    _FLAG_CACHE[pop.dose_mask] = (refs, tuple(t._version for t in tensors), flags)
    return flags


@dataclass
class Doses:
    """Doses with the individual parameters applied; every tensor is ``(N, D)``.

    Times in the data's time unit, amounts in its amount unit. Padding slots have
    ``mask`` False, zero amount and zero duration.
    """

    record_time: Tensor  # float, time of the dose record (TIME column)
    time: Tensor  # float, effective start: record_time + lag
    amount: Tensor  # float, F·AMT (0 in padding)
    duration: Tensor  # float, infusion duration after F (0 for a bolus)
    cmt: Tensor  # long, 0-based compartment index (data CMT 0 -> default)
    ss: Tensor  # bool, steady-state dose (SS 1 or 2)
    ii: Tensor  # float, interdose interval of SS doses; 1 elsewhere (a safe divisor)
    mask: Tensor  # bool, real dose
    epoch: Tensor  # long, reset epoch
    flags: DoseFlags

    @property
    def rate(self) -> Tensor:
        """Infusion rate ``amount / duration`` (amount per time unit), 0 for a bolus."""
        infusion = self.duration > 0
        return torch.where(infusion, self.amount / torch.where(infusion, self.duration, 1.0), 0.0)

    @property
    def lag(self) -> Tensor:
        """Lag time of each dose, ``time - record_time``."""
        return self.time - self.record_time


def _column(value, ref: Tensor) -> Tensor:
    """An individual parameter (``(N,)`` or scalar) as a column broadcasting against ``(N, D)``."""
    if isinstance(value, Tensor):
        value = value.to(device=ref.device)
    else:
        value = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    return value.reshape(-1, 1) if value.dim() else value


def per_dose_parameter(
    indiv: Mapping[str, Tensor],
    name: str,
    compartments: Sequence[str],
    cmt: Tensor,
    ref: Tensor,
    default: float,
) -> Tensor | None:
    """``indiv[name]`` for every dose, overridden by ``indiv[name_<cmt name>]`` per compartment.

    ``cmt`` is the ``(N, D)`` 0-based compartment index and ``ref`` a float tensor giving
    dtype and device. Returns a tensor broadcasting against ``(N, D)`` (a column ``(N, 1)``
    when no per-compartment override is given), or None when no such parameter is given;
    doses into compartments without an override get ``indiv[name]``, else ``default``.
    """
    value = _column(indiv[name], ref) if name in indiv else None
    for j, cname in enumerate(compartments):
        key = f"{name}_{cname}"
        if key in indiv:
            fallback = value if value is not None else torch.full_like(ref, default)
            value = torch.where(cmt == j, _column(indiv[key], ref), fallback)
    return value


def resolve_doses(
    indiv: Mapping[str, Tensor],
    pop: Population,
    compartments: Sequence[str],
    default_dose_cmt: int,
) -> Doses:
    """Apply bioavailability, lag and modelled rate/duration to ``pop``'s doses.

    ``indiv`` holds ``(N,)`` individual parameters; ``compartments`` are the model's
    compartment names (CMT numbering is 1-based in this order). Raises ValueError for a CMT
    out of range, a steady-state dose with II <= 0 or with an infusion longer than II, and
    KeyError when RATE = -1/-2 doses need ``indiv["rate"]`` / ``indiv["duration"]``.
    """
    flags = dose_flags(pop)
    n_cmt = len(compartments)
    where = f" in {pop.source}" if pop.source else ""
    if flags.max_cmt > n_cmt or flags.min_cmt < 0:
        raise ValueError(
            f"dose CMT out of range{where}: the model has compartments {list(compartments)} "
            f"(CMT 1..{n_cmt}), the data doses into CMT {flags.min_cmt}..{flags.max_cmt}"
        )
    if flags.bad_ii:
        raise ValueError(f"steady-state dose with II <= 0{where}")
    mask = pop.dose_mask
    ref = pop.dose_time
    cmt = torch.where(pop.dose_cmt > 0, pop.dose_cmt - 1, default_dose_cmt - 1)
    cmt = torch.where(mask, cmt, default_dose_cmt - 1)

    bioav = per_dose_parameter(indiv, "bioav", compartments, cmt, ref, 1.0)
    lag = per_dose_parameter(indiv, "lag", compartments, cmt, ref, 0.0)
    amount = pop.dose_amt if bioav is None else bioav * pop.dose_amt
    amount = torch.where(mask, amount, 0.0)
    time = ref if lag is None else torch.where(mask, ref + lag, ref)

    rate = pop.dose_rate
    duration = pop.dose_duration if bioav is None else bioav * pop.dose_duration
    if flags.modelled_duration:
        if "duration" not in indiv:
            raise KeyError(f"doses with RATE=-2{where} need the individual parameter 'duration'")
        dur = _column(indiv["duration"], ref)
        duration = torch.where(rate == RATE_MODELLED_DURATION, dur, duration)
    if flags.modelled_rate:
        if "rate" not in indiv:
            raise KeyError(f"doses with RATE=-1{where} need the individual parameter 'rate'")
        r = _column(indiv["rate"], ref)
        is_m1 = rate == RATE_MODELLED_RATE
        duration = torch.where(is_m1, amount / torch.where(is_m1, r, 1.0), duration)
    duration = torch.where(mask & (rate != 0), duration, 0.0)

    ss = mask & (pop.dose_ss > 0)
    ii = torch.where(ss, pop.dose_ii, 1.0)
    if flags.ss and flags.infusion and bool((ss & (duration > ii)).any()):
        raise ValueError(
            f"steady-state infusion longer than its dosing interval II{where}: "
            "not supported (duration must be <= II)"
        )
    return Doses(
        record_time=ref,
        time=time.expand_as(ref),
        amount=amount.expand_as(ref),
        duration=duration.expand_as(ref),
        cmt=cmt,
        ss=ss,
        ii=ii,
        mask=mask,
        epoch=pop.dose_epoch,
        flags=flags,
    )
