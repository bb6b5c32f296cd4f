"""Closed-form linear models against the ODE path on a padded batch of dosing scenarios."""

from __future__ import annotations

import pytest
import torch

from deepnlme.dynamics import OdeDynamics, OneCmtIV, OneCmtOral, TwoCmtIV, TwoCmtOral

BASE = dict(ka=1.2, cl=2.0, v=20.0, q=3.0, vp=40.0)


def D(time, amt, rate=0.0, cmt=None, ss=0, ii=0.0, epoch=0) -> dict:
    """Dose spec; ``cmt`` is a compartment name (None: model default)."""
    return dict(time=time, amt=amt, rate=rate, cmt=cmt, ss=ss, ii=ii, epoch=epoch)


# name -> (doses, observations (time or (time, epoch)), extra individual parameters)
SCENARIOS = {
    "single": ([D(0, 100)], [0, 0.25, 1, 2, 4, 8, 12, 24], {}),
    "multiple": ([D(0, 100), D(12, 50), D(24, 100)], [1, 12, 13, 24, 25, 36], {}),
    "iv_into_central": ([D(0, 100), D(6, 50, cmt="central")], [0, 3, 6, 7, 12], {}),
    "infusion": ([D(1, 100, rate=40)], [0, 1, 2, 3.5, 4, 10], {}),
    "infusion_central": ([D(0, 100, rate=25, cmt="central")], [1, 4, 6], {}),
    "modelled_duration": ([D(0, 100, rate=-2)], [1, 3, 5], {"duration": 3.0}),
    "modelled_rate": ([D(0, 100, rate=-1)], [1, 2.5, 5], {"rate": 40.0}),
    "lag_bioav": (
        [D(0, 100), D(12, 100)],
        [0, 0.5, 0.75, 1, 12.5, 13, 20],
        {"lag": 0.75, "bioav": 0.6},
    ),
    "lag_bioav_infusion": ([D(0, 100, rate=50)], [0.4, 1, 2.1, 3], {"lag": 0.5, "bioav": 0.8}),
    "addl": ([D(8 * i, 80) for i in range(6)], [2, 10, 18, 26, 34, 42, 50], {}),
    "ss_bolus": ([D(0, 100, ss=1, ii=12, epoch=1)], [(t, 1) for t in (0, 1, 6, 12, 13, 30)], {}),
    "ss_infusion": (
        [D(0, 100, rate=50, ss=1, ii=12, epoch=1)],
        [(t, 1) for t in (0, 1, 2, 6, 12, 15)],
        {},
    ),
    "ss_infusion_lag_tail": (
        [D(0, 90, rate=30, ss=1, ii=4, epoch=1)],
        [(t, 1) for t in (0, 0.5, 1, 2, 3, 5, 6, 9)],
        {"lag": 2.0},
    ),
    "ss_bolus_lag": (
        [D(5, 100, ss=1, ii=12, epoch=1)],
        [(t, 1) for t in (5, 6, 6.5, 10, 20)],
        {"lag": 1.5},
    ),
    "ss_modelled_duration": (
        [D(0, 100, rate=-2, ss=1, ii=12, epoch=1)],
        [(t, 1) for t in (0, 2, 4, 12)],
        {"duration": 3.0},
    ),
    "ss2_added": ([D(0, 100), D(24, 100, ss=2, ii=12)], [6, 24, 25, 30], {}),
    "reset": (
        [D(0, 100, rate=10), D(20, 50, epoch=1), D(0, 60, epoch=2)],
        [1, 4, (5, 1), (8, 1), (21, 1), (25, 1), (0, 2), (2, 2)],
        {},
    ),
    "peripheral": ([D(0, 100, cmt="peripheral")], [1, 5, 10], {}),
    "no_doses": ([], [1, 2], {}),
    "no_obs": ([D(0, 100)], [], {}),
}

# observations away from dose starts / infusion ends: smooth in every parameter
SMOOTH = {
    "smooth_multiple": ([D(0, 100), D(12, 50), D(24, 100)], [1, 12.3, 13, 24.5, 30], {}),
    "smooth_infusion": ([D(1, 100, rate=40)], [0.5, 2, 3.2, 4, 10], {"lag": 0.2, "bioav": 0.9}),
    "smooth_lag_bioav": (
        [D(0, 100), D(12, 100)],
        [0.5, 1, 12.5, 13, 20],
        {"lag": 0.75, "bioav": 0.6},
    ),
    "smooth_ss_bolus_lag": (
        [D(5, 100, ss=1, ii=12, epoch=1)],
        [(t, 1) for t in (5.5, 7, 10, 20)],
        {"lag": 1.5, "bioav": 0.8},
    ),
    "smooth_ss_infusion_lag_tail": (
        [D(0, 90, rate=30, ss=1, ii=4, epoch=1)],
        [(t, 1) for t in (0.5, 1, 2.5, 4.5, 7)],
        {"lag": 2.0, "bioav": 0.9},
    ),
}
SCENARIOS.update(SMOOTH)

MODELS = [OneCmtIV, OneCmtOral, TwoCmtIV, TwoCmtOral]


def scenario_batch(model, make_pop, names=None):
    """(population, indiv) with one subject per scenario that fits ``model``."""
    subjects, extras = [], []
    for name in names or SCENARIOS:
        doses, obs, extra = SCENARIOS[name]
        if any(d["cmt"] is not None and d["cmt"] not in model.compartments for d in doses):
            continue
        recs = []
        for d in doses:
            cmt = 0 if d["cmt"] is None else model.compartments.index(d["cmt"]) + 1
            dur = d["amt"] / d["rate"] if d["rate"] > 0 else 0.0
            recs.append({**d, "cmt": cmt, "dur": dur})
        subjects.append({"doses": recs, "obs": obs})
        extras.append(extra)
    pop = make_pop(subjects)
    n = len(subjects)
    scale = 1 + 0.03 * torch.arange(n, dtype=torch.float64)
    indiv = {k: v * scale for k, v in BASE.items() if k in model.required}
    defaults = {"lag": 0.0, "bioav": 1.0, "duration": 1.0, "rate": 1.0}
    for key, default in defaults.items():
        indiv[key] = torch.tensor([e.get(key, default) for e in extras], dtype=torch.float64)
    return pop, indiv


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_closed_form_matches_ode(model_cls, make_pop):
    model = model_cls()
    pop, indiv = scenario_batch(model, make_pop)
    closed = model(indiv, pop)
    ode = OdeDynamics.linear(model_cls, rtol=1e-7, atol=1e-7)(indiv, pop)
    assert closed.shape == (len(pop), pop.obs_time.shape[1], len(model.compartments))
    torch.testing.assert_close(closed, ode, rtol=1e-6, atol=1e-6)
    assert closed[~pop.obs_mask].abs().max() == 0


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_padding_does_not_change_results(model_cls, make_pop):
    model = model_cls()
    pop, indiv = scenario_batch(model, make_pop)
    batch = model(indiv, pop)
    for i in range(len(pop)):
        sub = pop.subset([i])
        one = model({k: v[i : i + 1] for k, v in indiv.items()}, sub)
        n_obs = sub.obs_time.shape[1]
        torch.testing.assert_close(batch[i : i + 1, :n_obs], one, rtol=1e-12, atol=1e-12)


SHAPES = ["single", "infusion", "modelled_duration", "ss_bolus", "ss_infusion_lag_tail", "reset"]


@pytest.mark.parametrize(
    "model_cls, rate",
    [(OneCmtOral, 0), (TwoCmtOral, 0), (TwoCmtOral, 1)],
    ids=["k", "alpha", "beta"],
)
def test_ka_equal_to_a_disposition_rate_matches_ode(model_cls, rate, make_pop):
    """ka == k (1-cmt) or ka == alpha / beta (2-cmt): the closed form's singular case."""
    model = model_cls()
    pop, indiv = scenario_batch(model, make_pop, SHAPES)
    lam, _ = model.disposition(indiv)
    indiv["ka"] = lam[:, rate].clone()
    closed = model(indiv, pop)
    ode = OdeDynamics.linear(model_cls, rtol=1e-7, atol=1e-7)(indiv, pop)
    torch.testing.assert_close(closed, ode, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_cls", [OneCmtOral, TwoCmtIV], ids=lambda c: c.__name__)
def test_ode_gradients_match_closed_form(model_cls, make_pop):
    """Autograd through odeint (and the implicit steady state) gives the closed form's
    gradients."""
    names = list(SMOOTH)
    model = model_cls()
    pop, base = scenario_batch(model, make_pop, names)
    weights = torch.linspace(0.5, 1.5, pop.obs_time.numel()).reshape(pop.obs_time.shape)
    wrt = [k for k in model.required + ("lag", "bioav")]

    def grads(dynamics):
        indiv = {k: v.clone().requires_grad_(k in wrt) for k, v in base.items()}
        out = dynamics(indiv, pop)[..., model.default_obs_cmt - 1]
        return torch.autograd.grad((out * weights).sum(), [indiv[k] for k in wrt])

    closed = grads(model)
    ode = grads(OdeDynamics.linear(model_cls, rtol=1e-7, atol=1e-7))
    for name, c, o in zip(wrt, closed, ode, strict=True):
        torch.testing.assert_close(o, c, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_no_tensor_created_on_the_default_device(model_cls, make_pop):
    """Forward and backward only create tensors on the inputs' device: with the default
    device set to "meta", any implicitly placed tensor would fail to mix with the CPU inputs."""
    model = model_cls()
    ode = OdeDynamics.linear(model_cls, rtol=1e-4, atol=1e-4)
    for dynamics, names in ((model, None), (ode, ["infusion", "ss_infusion_lag_tail", "reset"])):
        pop, indiv = scenario_batch(model, make_pop, names)
        indiv = {k: v.requires_grad_(True) for k, v in indiv.items()}
        torch.set_default_device("meta")
        try:
            out = dynamics(indiv, pop)
            out.sum().backward()
        finally:
            torch.set_default_device(None)
        assert out.device == pop.device
        assert all(v.grad is None or torch.isfinite(v.grad).all() for v in indiv.values())
