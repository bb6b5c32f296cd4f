"""Population: a validated event table as padded, masked tensors, batched over subjects.

Shapes: N subjects, T observation slots, D dose slots (after ADDL expansion), C covariates.
Times are in the units of the source file; amounts in the file's amount units.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

#: Sentinel values of ``dose_rate`` (NONMEM RATE column).
RATE_MODELLED_RATE = -1.0
RATE_MODELLED_DURATION = -2.0


@dataclass
class Population:
    """Subjects of an event table as padded tensors (the contract between data and models).

    Observation tensors are ``(N, T)``; dose tensors are ``(N, D)``; padding is marked by the
    masks and holds zeros. ``obs_epoch`` / ``dose_epoch`` count the resets (EVID 3/4, SS=1
    doses) before a record: a dose acts on an observation only when both share an epoch and
    ``dose_time <= obs_time``.
    """

    ids: list[str]  # N subject identifiers as written in the file
    covariate_names: list[str]  # C names, in column order of ``covariates``
    obs_time: Tensor  # (N, T) float, observation times
    obs_dv: Tensor  # (N, T) float, observed values (0 in padding)
    obs_cmt: Tensor  # (N, T) long, CMT of the observation (0 = model default)
    obs_mask: Tensor  # (N, T) bool, True where a real observation sits
    obs_epoch: Tensor  # (N, T) long, reset epoch of each observation
    obs_row: Tensor  # (N, T) long, 0-based data-row index in the source table (-1 in padding)
    dose_time: Tensor  # (N, D) float, dose times (ADDL expanded; lag time not applied)
    dose_amt: Tensor  # (N, D) float, dose amounts
    dose_rate: Tensor  # (N, D) float, 0 bolus, >0 zero-order rate, -1/-2 modelled rate/duration
    dose_duration: Tensor  # (N, D) float, infusion duration (AMT/RATE or DUR; 0 for bolus)
    dose_cmt: Tensor  # (N, D) long, CMT dosed into (0 = model default)
    dose_ss: Tensor  # (N, D) long, 0 none, 1 steady state (reset), 2 steady state (added)
    dose_ii: Tensor  # (N, D) float, interdose interval of steady-state doses
    dose_mask: Tensor  # (N, D) bool, True where a real dose sits
    dose_epoch: Tensor  # (N, D) long, reset epoch of each dose
    covariates: Tensor  # (N, C) float, covariates at each subject's first record
    obs_covariates: Tensor  # (N, T, C) float, covariates at observation times (LOCF)
    subject_index: Tensor  # (N,) long, position of each subject in the full dataset
    source: str = ""  # file name or dataset name, for messages
    meta: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_obs(self) -> int:
        return int(self.obs_mask.sum())

    @functools.cached_property
    def fully_observed(self) -> bool:
        """True when no observation slot is padding (every subject has T observations)."""
        return bool(self.obs_mask.all())

    @functools.cached_property
    def obs_dv_filled(self) -> Tensor:
        """``obs_dv`` ``(N, T)`` with each padding slot holding a real DV (the subject's first,
        else the population's): a value inside any observation distribution's support, so a
        likelihood evaluated on every slot (padding masked afterwards) stays finite."""
        if self.fully_observed or not bool(self.obs_mask.any()):
            return self.obs_dv
        first = self.obs_mask.to(torch.int8).argmax(-1, keepdim=True)  # (N, 1)
        own = self.obs_dv.gather(1, first)
        has_obs = self.obs_mask.any(-1, keepdim=True)
        fallback = self.obs_dv[self.obs_mask][0]
        fill = torch.where(has_obs, own, fallback)
        return torch.where(self.obs_mask, self.obs_dv, fill)

    @property
    def device(self) -> torch.device:
        return self.obs_time.device

    def covariate(self, name: str) -> Tensor:
        """Baseline covariate ``name`` as an ``(N,)`` tensor."""
        return self.covariates[:, self.covariate_names.index(name)]

    def baseline_covariates(self) -> dict[str, Tensor]:
        """Baseline covariates by name, each ``(N,)``."""
        return {n: self.covariates[:, j] for j, n in enumerate(self.covariate_names)}

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def to(self, device=None, dtype: torch.dtype | None = None) -> Population:
        """Move to ``device``; floating tensors are cast to ``dtype`` when given. Returns
        ``self`` when nothing would change (cached properties stay)."""
        changes = {}
        for name in self._tensor_fields():
            t = getattr(self, name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype=dtype)
            changes[name] = t.to(device) if device is not None else t
        if all(changes[name] is getattr(self, name) for name in changes):
            return self
        return replace(self, **changes)

    def subset(self, index: Tensor | list[int]) -> Population:
        """Subjects at positions ``index`` (trimmed of padding that no subject uses)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        changes = {name: getattr(self, name)[index] for name in self._tensor_fields()}
        changes["ids"] = np.asarray(self.ids, dtype=object)[index.cpu().numpy()].tolist()
        sub = replace(self, **changes)
        return sub.trimmed()

    def trimmed(self) -> Population:
        """Drop padding columns that are masked for every subject (keeps at least one)."""
        t_keep = max(int(self.obs_mask.sum(1).max()) if len(self) else 0, 1)
        d_keep = max(int(self.dose_mask.sum(1).max()) if len(self) else 0, 1)
        changes = {}
        for name in self._tensor_fields():
            t = getattr(self, name)
            if name.startswith("obs_"):
                t = t[:, :t_keep]
            elif name.startswith("dose_"):
                t = t[:, :d_keep]
            changes[name] = t
        return replace(self, **changes)
