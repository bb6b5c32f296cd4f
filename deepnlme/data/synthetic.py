"""Synthetic oral PK population with saturable (Michaelis–Menten) elimination.

No linear compartment model expresses these dynamics: the clearance falls as the
concentration rises, so exposure grows more than proportionally with the dose and
accumulates more under repeated dosing than any single-dose fit of a linear model predicts.
The data set is deterministic for a ``seed`` (numpy ``default_rng``, float64 arithmetic).
Units: time h, amount mg, volume L, clearance L/h, concentration mg/L.

True model (``TRUTH`` holds the constants)
-----------------------------------------
Covariates (baseline): ``WT`` (kg) ``75 · exp(0.2 z1)`` clipped to [40, 140]; ``AGE`` (years)
``Uniform(18, 85)``; ``SEX`` (0 male, 1 female) ``Bernoulli(0.5)``; ``CRCL`` (mL/min)
Cockcroft–Gault ``(140 − AGE) · WT / (72 · SCR) · (0.85 if SEX = 1)`` from a latent serum
creatinine ``SCR = 0.9 · exp(0.35 z2)`` mg/dL, clipped to [10, 200].

Individual parameters (independent log-normal random effects)::

    KA   = KA0 · exp(η_ka)                                              KA0 = 1.0 1/h
    V    = V0 · (WT / 70) · exp(η_v)                                    V0 = 40 L
    VMAX = VM0 · (FNR + (1 − FNR) · CRCL^H / (CE50^H + CRCL^H)) · exp(η_vmax)
                                      VM0 = 15 mg/h, FNR = 0.3, CE50 = 60 mL/min, H = 2
    ω: η_ka 0.30, η_vmax 0.25, η_v 0.20 (SDs)

Dynamics (depot → central, oral doses into the depot, CMT 1; observations of CMT 2)::

    dA1/dt = −KA · A1
    dA2/dt =  KA · A1 − CLL · C − VMAX · C / (KM + C),      C = A2 / V
    CLL = 0.4 L/h (linear, non-saturable), KM = 1.0 mg/L

Observations ``DV = C · (1 + 0.1 ε)``, ε ~ N(0, 1) (proportional error, σ = 0.1).

Designs
-------
* Fit and held-out subjects (:func:`synthetic_pk`): one oral dose each, the dose level
  cycling through ``DOSES`` = 50, 150, 450 mg (subject i gets ``DOSES[i % 3]``);
  ``n_obs`` samples at ``geomspace(0.5, 48, n_obs)`` h, each multiplied by ``exp(0.1 z)``,
  sorted.
* Held-out regimen (:func:`synthetic_pk_regimen`): new subjects (own seeded stream) on
  repeated dosing never seen in fitting, 100 mg every 12 h, 7 doses (``ADDL 6``), sampled at
  ``REGIMEN_TIMES`` (peaks and troughs up to 96 h).

The concentrations are integrated by classical RK4 on each subject's own event grid
(``SUBSTEPS`` steps between consecutive events, doses applied as jumps): relative error
below 1e-6 of the exact solution.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from deepnlme.data.frames import population_from_frame
from deepnlme.data.population import Population

#: Covariate names in column order of ``Population.covariates``.
COVARIATES = ("WT", "AGE", "SEX", "CRCL")

#: Constants of the true model (see the module docstring).
TRUTH = {
    "KA0": 1.0,
    "V0": 40.0,
    "VM0": 15.0,
    "FNR": 0.3,
    "CE50": 60.0,
    "H": 2.0,
    "KM": 1.0,
    "CLL": 0.4,
    "OMEGA_SD": {"ka": 0.30, "vmax": 0.25, "v": 0.20},
    "SIGMA_PROP": 0.10,
    "T_FIRST": 0.5,
    "T_LAST": 48.0,
    "TIME_JITTER_SD": 0.10,
}

#: Single-dose levels (mg) of the fit / held-out subjects, assigned cyclically.
DOSES = (50.0, 150.0, 450.0)

#: The held-out regimen: amount (mg), interval (h), additional doses.
REGIMEN = {"amt": 100.0, "ii": 12.0, "addl": 6}

#: Sampling times (h) of the held-out regimen.
REGIMEN_TIMES = (1.0, 4.0, 11.5, 26.0, 35.5, 49.0, 59.5, 73.0, 83.5, 86.0, 96.0)

#: RK4 steps between consecutive events of a subject when simulating the truth.
SUBSTEPS = 400

#: Seed stream offset of the held-out regimen's subjects (independent of the fit subjects).
REGIMEN_STREAM = 1


def true_parameters(wt, crcl) -> dict:
    """Typical (η = 0) ``ka`` (1/h), ``vmax`` (mg/h), ``v`` (L), each ``(N,)``, plus the
    constants ``km`` (mg/L) and ``cll`` (L/h). Works on numpy arrays and on tensors."""
    t = TRUTH
    if not isinstance(wt, torch.Tensor):
        wt, crcl = (np.asarray(x, dtype=np.float64) for x in (wt, crcl))
    sig = crcl ** t["H"] / (t["CE50"] ** t["H"] + crcl ** t["H"])
    vmax = t["VM0"] * (t["FNR"] + (1.0 - t["FNR"]) * sig)
    v = t["V0"] * (wt / 70.0)
    ka = t["KA0"] + 0.0 * wt
    return {"ka": ka, "vmax": vmax, "v": v, "km": t["KM"], "cll": t["CLL"]}


def one_cmt_oral_conc(
    t: np.ndarray, dose: float | np.ndarray, ka: np.ndarray, cl: np.ndarray, v: np.ndarray
) -> np.ndarray:
    """Closed-form linear one-compartment concentration at times ``t`` ``(N, T)`` after one
    oral ``dose`` (scalar or ``(N, 1)``) for parameters ``(N,)``."""
    ke = (cl / v)[:, None]
    ka = ka[:, None]
    return dose * ka / (v[:, None] * (ka - ke)) * (np.exp(-ke * t) - np.exp(-ka * t))


def michaelis_menten_conc(
    obs_time: np.ndarray,
    dose_time: np.ndarray,
    dose_amt: np.ndarray,
    indiv: dict,
    substeps: int = SUBSTEPS,
) -> np.ndarray:
    """Concentration ``(N, T)`` of the true model at ``obs_time`` ``(N, T)`` after oral doses
    ``(N, D)`` at ``dose_time`` (times sorted per subject; a dose at an observation time acts
    on it). ``indiv``: ``ka, vmax, v`` ``(N,)`` and ``km, cll`` (scalars or ``(N,)``).

    Classical RK4 with ``substeps`` steps between consecutive events, all subjects at once.
    """
    n, n_obs = obs_time.shape
    n_dose = dose_time.shape[1]
    ka, vmax, v = (np.asarray(indiv[k], dtype=np.float64) for k in ("ka", "vmax", "v"))
    km, cll = indiv["km"], indiv["cll"]
    times = np.concatenate([dose_time, obs_time], axis=1)
    is_dose = np.concatenate([np.ones((n, n_dose), bool), np.zeros((n, n_obs), bool)], axis=1)
    jump = np.concatenate([dose_amt, np.zeros((n, n_obs))], axis=1)
    order = np.lexsort((~is_dose, times), axis=1)  # by time, doses first at ties
    times, is_dose, jump = (np.take_along_axis(a, order, 1) for a in (times, is_dose, jump))

    def rhs(a1: np.ndarray, a2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = a2 / v
        return -ka * a1, ka * a1 - cll * c - vmax * c / (km + c)

    a1 = np.zeros(n)
    a2 = np.zeros(n)
    t_prev = np.zeros(n)
    conc = np.zeros((n, times.shape[1]))
    for k in range(times.shape[1]):
        h = (times[:, k] - t_prev) / substeps
        for _ in range(substeps):
            k1 = rhs(a1, a2)
            k2 = rhs(a1 + 0.5 * h * k1[0], a2 + 0.5 * h * k1[1])
            k3 = rhs(a1 + 0.5 * h * k2[0], a2 + 0.5 * h * k2[1])
            k4 = rhs(a1 + h * k3[0], a2 + h * k3[1])
            a1 = a1 + h / 6.0 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            a2 = a2 + h / 6.0 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        a1 = a1 + jump[:, k]
        t_prev = times[:, k]
        conc[:, k] = a2 / v
    inverse = np.argsort(order, axis=1)
    return np.take_along_axis(conc, inverse[:, n_dose:], 1)


def _draw_subjects(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Covariates ``(n, 4)``, η ``(n, 3)`` (ka, vmax, v) and individual parameters."""
    z_wt = rng.standard_normal(n)
    age = rng.uniform(18.0, 85.0, n)
    sex = (rng.uniform(0.0, 1.0, n) < 0.5).astype(np.float64)
    z_scr = rng.standard_normal(n)
    eta = rng.standard_normal((n, 3))
    wt = np.clip(75.0 * np.exp(0.2 * z_wt), 40.0, 140.0)
    scr = 0.9 * np.exp(0.35 * z_scr)
    crcl = (140.0 - age) * wt / (72.0 * scr) * np.where(sex == 1.0, 0.85, 1.0)
    crcl = np.clip(crcl, 10.0, 200.0)
    typical = true_parameters(wt, crcl)
    sd = TRUTH["OMEGA_SD"]
    eta = eta * np.array([sd["ka"], sd["vmax"], sd["v"]])
    indiv = {k: typical[k] * np.exp(eta[:, j]) for j, k in enumerate(("ka", "vmax", "v"))}
    indiv.update(km=TRUTH["KM"], cll=TRUTH["CLL"])
    return {
        "covariates": np.stack([wt, age, sex, crcl], axis=1),
        "eta": eta,
        "typical": {k: typical[k] for k in ("ka", "vmax", "v")},
        "indiv": indiv,
    }


def _simulate(n_subjects: int, seed: int, n_obs: int, regimen: bool) -> dict:
    """All draws and derived arrays of one design (float64 numpy)."""
    if n_subjects < 1 or n_obs < 1:
        raise ValueError(f"need n_subjects >= 1 and n_obs >= 1, got {n_subjects}, {n_obs}")
    n = int(n_subjects)
    rng = np.random.default_rng([int(seed), REGIMEN_STREAM] if regimen else int(seed))
    sim = _draw_subjects(rng, n)
    if regimen:
        times = np.tile(np.asarray(REGIMEN_TIMES, dtype=np.float64), (n, 1))
        k = np.arange(REGIMEN["addl"] + 1)
        dose_time = np.tile(k * REGIMEN["ii"], (n, 1)).astype(np.float64)
        dose_amt = np.full(dose_time.shape, REGIMEN["amt"])
    else:
        t = int(n_obs)
        nominal = np.geomspace(TRUTH["T_FIRST"], TRUTH["T_LAST"], t) if t > 1 else np.array([8.0])
        jitter = rng.standard_normal((n, t))
        times = np.sort(nominal[None, :] * np.exp(TRUTH["TIME_JITTER_SD"] * jitter), axis=1)
        dose_time = np.zeros((n, 1))
        dose_amt = np.asarray(DOSES)[np.arange(n) % len(DOSES)][:, None]
    eps = rng.standard_normal(times.shape)
    conc = michaelis_menten_conc(times, dose_time, dose_amt, sim["indiv"])
    dv = conc * (1.0 + TRUTH["SIGMA_PROP"] * eps)
    return {**sim, "times": times, "dose_time": dose_time, "dose_amt": dose_amt,
            "conc": conc, "dv": dv, "regimen": regimen}


def _table(sim: dict, prefix: str) -> pd.DataFrame:
    """NONMEM-style event table of a simulated design (doses as ADDL/II for the regimen)."""
    n, t = sim["times"].shape
    ids = np.array([f"{prefix}{i + 1}" for i in range(n)])
    if sim["regimen"]:
        dose = {"TIME": np.zeros(n), "AMT": np.full(n, REGIMEN["amt"]),
                "II": np.full(n, REGIMEN["ii"]), "ADDL": np.full(n, REGIMEN["addl"])}
    else:
        dose = {"TIME": sim["dose_time"][:, 0], "AMT": sim["dose_amt"][:, 0],
                "II": np.zeros(n), "ADDL": np.zeros(n, dtype=np.int64)}
    doses = pd.DataFrame({"ID": ids, **dose, "DV": 0.0, "EVID": 1, "MDV": 1, "CMT": 1})
    obs = pd.DataFrame({
        "ID": np.repeat(ids, t), "TIME": sim["times"].ravel(), "AMT": 0.0, "II": 0.0, "ADDL": 0,
        "DV": sim["dv"].ravel(), "EVID": 0, "MDV": 0, "CMT": 2,
    })
    doses["_subject"], obs["_subject"] = np.arange(n), np.repeat(np.arange(n), t)
    doses["_kind"], obs["_kind"] = 0, 1
    frame = pd.concat([doses, obs], ignore_index=True)
    frame = frame.sort_values(["_subject", "TIME", "_kind"], kind="stable")
    for j, name in enumerate(COVARIATES):
        frame[name] = sim["covariates"][frame["_subject"].to_numpy(), j]
    columns = ["ID", "TIME", "AMT", "II", "ADDL", "DV", "EVID", "MDV", "CMT", *COVARIATES]
    return frame[columns].reset_index(drop=True)


def _population(sim: dict, prefix: str, source: str, seed: int, dtype) -> Population:
    dtype = dtype or torch.get_default_dtype()
    pop = population_from_frame(_table(sim, prefix), COVARIATES, source, dtype)

    def fl(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)

    indiv = {k: fl(sim["indiv"][k]) for k in ("ka", "vmax", "v")}
    pop.meta.update(
        truth=dict(TRUTH),
        seed=int(seed),
        true_typical={k: fl(v) for k, v in sim["typical"].items()},
        true_individual=indiv,
        true_eta=fl(sim["eta"]),
        true_conc=fl(sim["conc"]),
    )
    return pop


def synthetic_pk(
    n_subjects: int = 200, seed: int = 0, n_obs: int = 8, dtype: torch.dtype | None = None
) -> Population:
    """The single-dose population (fit and held-out subjects; see the module docstring).

    Args:
        n_subjects: N subjects (ids ``"1"``..``"N"``), dose ``DOSES[i % 3]`` for subject i.
        seed: seed of every random draw; equal seeds give identical tensors.
        n_obs: T observations per subject (one dose each, D = 1).
        dtype: floating dtype of the tensors (default: torch's default dtype).

    Returns:
        A :class:`Population` (covariates ``COVARIATES``, observations of CMT 2, one bolus
        into CMT 1 per subject) built from :func:`synthetic_pk_table` by the event-table
        builder. ``meta`` holds ``truth`` and ``true_typical`` / ``true_individual`` (``ka,
        vmax, v``) / ``true_eta`` / ``true_conc``, indexed by ``subject_index``.
    """
    sim = _simulate(n_subjects, seed, n_obs, regimen=False)
    return _population(sim, "", "synthetic_pk", seed, dtype)


def synthetic_pk_regimen(
    n_subjects: int = 50, seed: int = 0, dtype: torch.dtype | None = None
) -> Population:
    """The held-out regimen: ``n_subjects`` new subjects (ids ``"R1"``.., drawn from a seed
    stream of their own) on ``REGIMEN`` (100 mg every 12 h, 7 doses), sampled at
    ``REGIMEN_TIMES``. Same true model and ``meta`` as :func:`synthetic_pk`."""
    sim = _simulate(n_subjects, seed, len(REGIMEN_TIMES), regimen=True)
    return _population(sim, "R", "synthetic_pk_regimen", seed, dtype)


def synthetic_pk_table(n_subjects: int = 200, seed: int = 0, n_obs: int = 8) -> pd.DataFrame:
    """:func:`synthetic_pk`'s data as a NONMEM-style event table (``ID, TIME, AMT, II, ADDL,
    DV, EVID, MDV, CMT, WT, AGE, SEX, CRCL``; per subject its dose row, then observations)."""
    return _table(_simulate(n_subjects, seed, n_obs, regimen=False), "")


def synthetic_pk_regimen_table(n_subjects: int = 50, seed: int = 0) -> pd.DataFrame:
    """:func:`synthetic_pk_regimen`'s data as a NONMEM-style event table (one dose row with
    ``ADDL``/``II`` per subject)."""
    return _table(_simulate(n_subjects, seed, len(REGIMEN_TIMES), regimen=True), "R")
