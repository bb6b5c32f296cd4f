"""Synthetic one-compartment oral PK population whose covariate effects defeat power/linear forms.

The data set is fully deterministic for a given ``seed`` (numpy ``default_rng``, float64
arithmetic), so the same call gives identical tensors on any machine. Units: time h, amount
mg, volume L, clearance L/h, concentration mg/L.

True model (what :func:`true_parameters` computes; ``meta["truth"]`` holds the constants)
----------------------------------------------------------------------------------------
Covariates (one row per subject, baseline = constant over time):

* ``WT``   body weight (kg):      ``75 · exp(0.2 · z1)`` clipped to [40, 140]
* ``AGE``  age (years):           ``Uniform(18, 85)``
* ``SEX``  0 male, 1 female:      ``Bernoulli(0.5)``
* ``CRCL`` creatinine clearance (mL/min), Cockcroft–Gault from a latent serum creatinine
  ``SCR = 0.9 · exp(0.35 · z2)`` (mg/dL):
  ``CRCL = (140 − AGE) · WT / (72 · SCR) · (0.85 if SEX = 1)`` clipped to [10, 200].

Typical (η = 0) individual parameters:

* ``CL = CLNR + CLMAX · CRCL^H / (CE50^H + CRCL^H)``  — a sigmoid Emax in CRCL that
  saturates above ~120 mL/min, with ``CLNR = 0.5``, ``CLMAX = 6.0`` L/h, ``CE50 = 60`` mL/min,
  ``H = 2``;
* ``V  = V0 · (WT/70) · (1 + VA · exp(−((AGE − 50)/15)²))`` — a non-monotone (bell-shaped)
  age effect peaking at 50 years, ``V0 = 30`` L, ``VA = 0.8``;
* ``KA = KA0 · exp(KI · (WT − 75)/15 · (AGE − 50)/20)`` — a WT×AGE interaction,
  ``KA0 = 1.2`` 1/h, ``KI = 0.35``. ``SEX`` acts only through CRCL.

Individual parameters ``P_i = P_typ(cov_i) · exp(η_P,i)`` with independent
``η_ka ~ N(0, 0.30²)``, ``η_cl ~ N(0, 0.25²)``, ``η_v ~ N(0, 0.20²)``.

Design: one oral dose of ``DOSE = 100`` mg at time 0 into the depot (CMT 1); ``n_obs``
samples of the central compartment (CMT 2) at nominal times ``geomspace(0.25, 36, n_obs)`` h,
each multiplied by ``exp(0.1 · z)`` (jitter), sorted. Concentration
``C(t) = DOSE · KA / (V · (KA − KE)) · (exp(−KE·t) − exp(−KA·t))``, ``KE = CL / V``.
Observations ``DV = C · (1 + 0.1 · ε)``, ε ~ N(0, 1) (proportional error, σ = 0.1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from deepnlme.data.population import Population

#: Covariate names in column order of ``Population.covariates``.
COVARIATES = ("WT", "AGE", "SEX", "CRCL")

#: Constants of the true model (see the module docstring).
TRUTH = {
    "DOSE": 100.0,
    "CLNR": 0.5,
    "CLMAX": 6.0,
    "CE50": 60.0,
    "H": 2.0,
    "V0": 30.0,
    "VA": 0.8,
    "AGE_PEAK": 50.0,
    "AGE_WIDTH": 15.0,
    "KA0": 1.2,
    "KI": 0.35,
    "OMEGA_SD": {"ka": 0.30, "cl": 0.25, "v": 0.20},
    "SIGMA_PROP": 0.10,
    "T_FIRST": 0.25,
    "T_LAST": 36.0,
    "TIME_JITTER_SD": 0.10,
}


def true_parameters(wt, age, crcl) -> dict:
    """Typical (η = 0) ``ka`` (1/h), ``cl`` (L/h), ``v`` (L) of the true model, each ``(N,)``.

    Works on numpy arrays (float64 results) and on tensors (same dtype/device, differentiable).
    """
    if isinstance(wt, torch.Tensor):
        exp = torch.exp
    else:
        exp = np.exp
        wt, age, crcl = (np.asarray(x, dtype=np.float64) for x in (wt, age, crcl))
    t = TRUTH
    sig = crcl ** t["H"] / (t["CE50"] ** t["H"] + crcl ** t["H"])
    cl = t["CLNR"] + t["CLMAX"] * sig
    bell = exp(-(((age - t["AGE_PEAK"]) / t["AGE_WIDTH"]) ** 2))
    v = t["V0"] * (wt / 70.0) * (1.0 + t["VA"] * bell)
    ka = t["KA0"] * exp(t["KI"] * (wt - 75.0) / 15.0 * (age - 50.0) / 20.0)
    return {"ka": ka, "cl": cl, "v": v}


def one_cmt_oral_conc(
    t: np.ndarray, dose: float | np.ndarray, ka: np.ndarray, cl: np.ndarray, v: np.ndarray
) -> np.ndarray:
    """Closed-form concentration at times ``t`` ``(N, T)`` (or ``(1, T)``) after one oral
    ``dose`` (scalar or ``(N, 1)``) for parameters ``(N,)``, ``(N, T)``."""
    ke = (cl / v)[:, None]
    ka = ka[:, None]
    return dose * ka / (v[:, None] * (ka - ke)) * (np.exp(-ke * t) - np.exp(-ka * t))


def _simulate(n_subjects: int, seed: int, n_obs: int) -> dict[str, np.ndarray]:
    """All random draws and derived arrays of the data set (float64 numpy)."""
    if n_subjects < 1 or n_obs < 1:
        raise ValueError(f"need n_subjects >= 1 and n_obs >= 1, got {n_subjects}, {n_obs}")
    rng = np.random.default_rng(int(seed))
    n, t = int(n_subjects), int(n_obs)
    # Draws are made in a fixed order, each as one block, so results depend only on the seed.
    z_wt = rng.standard_normal(n)
    age = rng.uniform(18.0, 85.0, n)
    sex = (rng.uniform(0.0, 1.0, n) < 0.5).astype(np.float64)
    z_scr = rng.standard_normal(n)
    eta = rng.standard_normal((n, 3))
    jitter = rng.standard_normal((n, t))
    eps = rng.standard_normal((n, t))

    wt = np.clip(75.0 * np.exp(0.2 * z_wt), 40.0, 140.0)
    scr = 0.9 * np.exp(0.35 * z_scr)
    crcl = (140.0 - age) * wt / (72.0 * scr) * np.where(sex == 1.0, 0.85, 1.0)
    crcl = np.clip(crcl, 10.0, 200.0)

    typical = true_parameters(wt, age, crcl)
    sd = TRUTH["OMEGA_SD"]
    eta = eta * np.array([sd["ka"], sd["cl"], sd["v"]])
    indiv = {k: typical[k] * np.exp(eta[:, j]) for j, k in enumerate(("ka", "cl", "v"))}

    nominal = np.geomspace(TRUTH["T_FIRST"], TRUTH["T_LAST"], t) if t > 1 else np.array([4.0])
    times = np.sort(nominal[None, :] * np.exp(TRUTH["TIME_JITTER_SD"] * jitter), axis=1)
    conc = one_cmt_oral_conc(times, TRUTH["DOSE"], indiv["ka"], indiv["cl"], indiv["v"])
    dv = conc * (1.0 + TRUTH["SIGMA_PROP"] * eps)
    covariates = np.stack([wt, age, sex, crcl], axis=1)
    return {
        "covariates": covariates,
        "times": times,
        "conc": conc,
        "dv": dv,
        "eta": eta,
        "typical": typical,
        "indiv": indiv,
    }


def synthetic_pk(
    n_subjects: int = 200, seed: int = 0, n_obs: int = 10, dtype: torch.dtype | None = None
) -> Population:
    """The synthetic population (see the module docstring for the true model).

    Args:
        n_subjects: N subjects (ids ``"1"``..``"N"``).
        seed: seed of every random draw; equal seeds give identical tensors.
        n_obs: T observations per subject (one dose each, D = 1).
        dtype: floating dtype of the tensors (default: torch's default dtype).

    Returns:
        A :class:`Population` with covariates ``COVARIATES`` ``(N, 4)``, observations of the
        central compartment (CMT 2) ``(N, T)`` and one bolus dose into the depot (CMT 1)
        ``(N, 1)``. ``obs_row`` indexes the rows of :func:`synthetic_pk_table`. ``meta`` holds
        ``truth`` (the constants), and ``true_typical`` / ``true_individual`` / ``true_eta`` /
        ``true_conc`` — tensors indexed by ``subject_index`` (valid for subsets too).
    """
    dtype = dtype or torch.get_default_dtype()
    sim = _simulate(n_subjects, seed, n_obs)
    n, t = sim["times"].shape

    def fl(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)

    covariates = fl(sim["covariates"])
    zeros_d = torch.zeros(n, 1, dtype=dtype)
    obs_row = torch.arange(t, dtype=torch.long)[None, :] + 1 + (t + 1) * torch.arange(n)[:, None]
    return Population(
        ids=[str(i + 1) for i in range(n)],
        covariate_names=list(COVARIATES),
        obs_time=fl(sim["times"]),
        obs_dv=fl(sim["dv"]),
        obs_cmt=torch.full((n, t), 2, dtype=torch.long),
        obs_mask=torch.ones(n, t, dtype=torch.bool),
        obs_epoch=torch.zeros(n, t, dtype=torch.long),
        obs_row=obs_row,
        dose_time=zeros_d.clone(),
        dose_amt=torch.full((n, 1), TRUTH["DOSE"], dtype=dtype),
        dose_rate=zeros_d.clone(),
        dose_duration=zeros_d.clone(),
        dose_cmt=torch.ones(n, 1, dtype=torch.long),
        dose_ss=torch.zeros(n, 1, dtype=torch.long),
        dose_ii=zeros_d.clone(),
        dose_mask=torch.ones(n, 1, dtype=torch.bool),
        dose_epoch=torch.zeros(n, 1, dtype=torch.long),
        covariates=covariates,
        obs_covariates=covariates[:, None, :].expand(n, t, len(COVARIATES)).clone(),
        subject_index=torch.arange(n),
        source="synthetic_pk",
        meta={
            "truth": dict(TRUTH),
            "seed": int(seed),
            "true_typical": {k: fl(v) for k, v in sim["typical"].items()},
            "true_individual": {k: fl(v) for k, v in sim["indiv"].items()},
            "true_eta": fl(sim["eta"]),
            "true_conc": fl(sim["conc"]),
        },
    )


def synthetic_pk_table(n_subjects: int = 200, seed: int = 0, n_obs: int = 10) -> pd.DataFrame:
    """The same data as :func:`synthetic_pk` as a NONMEM-style event table.

    Columns ``ID, TIME, AMT, DV, EVID, MDV, CMT, WT, AGE, SEX, CRCL``; per subject one dose
    row (EVID 1, CMT 1, DV 0) followed by its ``n_obs`` observation rows (EVID 0, CMT 2), so
    row ``i · (n_obs + 1) + 1 + j`` is observation ``j`` of subject ``i`` (``obs_row``).
    """
    sim = _simulate(n_subjects, seed, n_obs)
    n, t = sim["times"].shape
    rows_per = t + 1
    ids = np.repeat(np.arange(1, n + 1), rows_per)
    is_dose = np.tile(np.r_[True, np.zeros(t, dtype=bool)], n)
    time = np.concatenate([np.zeros((n, 1)), sim["times"]], axis=1).ravel()
    dv = np.concatenate([np.zeros((n, 1)), sim["dv"]], axis=1).ravel()
    frame = pd.DataFrame(
        {
            "ID": ids,
            "TIME": time,
            "AMT": np.where(is_dose, TRUTH["DOSE"], 0.0),
            "DV": dv,
            "EVID": np.where(is_dose, 1, 0),
            "MDV": np.where(is_dose, 1, 0),
            "CMT": np.where(is_dose, 1, 2),
        }
    )
    for j, name in enumerate(COVARIATES):
        frame[name] = np.repeat(sim["covariates"][:, j], rows_per)
    return frame
