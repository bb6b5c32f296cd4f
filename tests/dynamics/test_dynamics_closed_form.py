"""Closed-form linear models: textbook formulas, ka == k, gradients, dtypes and errors."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

from deepnlme.dynamics import OneCmtIV, OneCmtOral, TwoCmtIV, TwoCmtOral
from deepnlme.dynamics.closed_form import phi1, phi2

TIMES = [0.0, 0.5, 1.0, 2.0, 5.0, 12.0, 24.0]


def one_subject(make_pop, doses, times=TIMES, epoch=0):
    return make_pop([{"doses": doses, "obs": [(t, epoch) for t in times]}])


def p(**kw):
    return {k: torch.tensor([float(v)]) for k, v in kw.items()}


def test_one_cmt_iv_bolus_textbook(make_pop, make_dose):
    pop = one_subject(make_pop, [make_dose(0.0, 100.0)])
    amounts = OneCmtIV()(p(cl=2.0, v=20.0), pop)
    t = pop.obs_time[0]
    conc = amounts[0, :, 0] / 20.0
    torch.testing.assert_close(conc, 100.0 / 20.0 * torch.exp(-0.1 * t), rtol=1e-13, atol=0)


def test_one_cmt_iv_infusion_and_ss_textbook(make_pop, make_dose):
    k, dur, rate = 0.1, 3.0, 20.0
    pop = one_subject(make_pop, [make_dose(0.0, rate * dur, rate=rate)])
    a = OneCmtIV()(p(cl=2.0, v=20.0), pop)[0, :, 0]
    t = pop.obs_time[0]
    during = rate / k * (1 - torch.exp(-k * t))
    after = rate / k * (1 - math.exp(-k * dur)) * torch.exp(-k * (t - dur))
    torch.testing.assert_close(a, torch.where(t <= dur, during, after), rtol=1e-13, atol=1e-12)

    ii = 12.0
    pop = one_subject(make_pop, [make_dose(0.0, 100.0, ss=1, ii=ii, epoch=1)], epoch=1)
    a = OneCmtIV()(p(cl=2.0, v=20.0), pop)[0, :, 0]
    expected = 100.0 * torch.exp(-k * t) / (1 - math.exp(-k * ii))
    torch.testing.assert_close(a, expected, rtol=1e-13, atol=0)


def test_one_cmt_oral_textbook(make_pop, make_dose):
    ka, k, f = 1.5, 0.1, 0.7
    pop = one_subject(make_pop, [make_dose(0.0, 100.0)])
    a = OneCmtOral()({**p(ka=ka, cl=2.0, v=20.0), **p(bioav=f)}, pop)[0]
    t = pop.obs_time[0]
    depot = f * 100.0 * torch.exp(-ka * t)
    central = f * 100.0 * ka / (ka - k) * (torch.exp(-k * t) - torch.exp(-ka * t))
    torch.testing.assert_close(a[:, 0], depot, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(a[:, 1], central, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_cls", [TwoCmtIV, TwoCmtOral], ids=lambda c: c.__name__)
def test_two_cmt_against_matrix_exponential(model_cls, make_pop, make_dose):
    model = model_cls()
    indiv = p(ka=0.9, cl=3.0, v=15.0, q=2.0, vp=30.0)
    t = torch.tensor(TIMES)
    k = model.rate_matrix(indiv)[0]
    for cmt in range(1, len(model.compartments) + 1):
        pop = one_subject(make_pop, [make_dose(0.0, 50.0, cmt=cmt)])
        a = model(indiv, pop)[0]
        expected = torch.linalg.matrix_exp(k * t[:, None, None])[:, :, cmt - 1] * 50.0
        torch.testing.assert_close(a, expected, rtol=1e-10, atol=1e-10)


def test_ka_equal_k_limit_and_continuity(make_pop, make_dose):
    """At ka == k the oral response is ka·D·t·exp(-k t); nearby values are continuous."""
    k = 0.1
    pop = one_subject(make_pop, [make_dose(0.0, 100.0)])
    t = pop.obs_time[0]
    a = OneCmtOral()(p(ka=k, cl=2.0, v=20.0), pop)[0, :, 1]
    torch.testing.assert_close(a, k * 100.0 * t * torch.exp(-k * t), rtol=1e-13, atol=1e-13)
    for rel in (1e-9, 1e-6, 1e-3, 1e-1):
        ka = k * (1 + rel)
        near = OneCmtOral()(p(ka=ka, cl=2.0, v=20.0), pop)[0, :, 1]
        direct = 100.0 * ka / (ka - k) * (torch.exp(-k * t) - torch.exp(-ka * t))
        tol = 1e-12 / rel + 1e-12
        torch.testing.assert_close(near, direct, rtol=tol, atol=tol * 100)


def mixed_population(make_pop, make_dose):
    """Bolus, infusion (ongoing/finished), modelled duration, SS bolus and SS infusion with
    lag; padded (subjects with different numbers of doses/observations)."""
    return make_pop(
        [
            {"doses": [make_dose(0.0, 100.0), make_dose(6.0, 50.0, cmt=2)], "obs": [0.0, 1.0, 7.0]},
            {"doses": [make_dose(1.0, 100.0, rate=40.0)], "obs": [0.5, 2.0, 3.5, 8.0]},
            {"doses": [make_dose(0.0, 80.0, rate=-2.0)], "obs": [1.0, 5.0]},
            {"doses": [make_dose(0.0, 100.0, ss=1, ii=12.0, epoch=1)], "obs": [(0.2, 1), (3.0, 1)]},
            {
                "doses": [make_dose(0.0, 90.0, rate=30.0, ss=1, ii=4.0, epoch=1)],
                "obs": [(0.5, 1), (2.5, 1), (6.0, 1)],
            },
        ]
    )


def mixed_indiv(n, ka_equals_k: bool):
    cl, v = torch.full((n,), 2.0), torch.full((n,), 20.0)
    ka = cl / v if ka_equals_k else torch.full((n,), 1.1)
    return dict(
        ka=ka,
        cl=cl,
        v=v,
        lag=torch.tensor([0.2, 0.3, 0.1, 0.5, 1.5]),
        bioav=torch.tensor([0.8, 0.9, 1.0, 0.7, 0.6]),
        duration=torch.full((n,), 2.5),
    )


@pytest.mark.parametrize("ka_equals_k", [False, True], ids=["ka!=k", "ka==k"])
def test_gradcheck_one_cmt_oral(make_pop, make_dose, ka_equals_k):
    pop = mixed_population(make_pop, make_dose)
    base = mixed_indiv(len(pop), ka_equals_k)
    names = list(base)
    model = OneCmtOral()

    def f(*values):
        return model(dict(zip(names, values, strict=True)), pop)

    inputs = tuple(v.clone().requires_grad_(True) for v in base.values())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradgradcheck_at_ka_equal_k(make_pop, make_dose):
    pop = mixed_population(make_pop, make_dose)
    base = mixed_indiv(len(pop), True)
    model = OneCmtOral()

    def f(ka, cl):
        return model({**base, "ka": ka, "cl": cl}, pop)

    inputs = (base["ka"].clone().requires_grad_(True), base["cl"].clone().requires_grad_(True))
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["alpha", "beta"])
def test_gradcheck_two_cmt_oral_ka_at_macro_rate(make_pop, make_dose, which):
    pop = mixed_population(make_pop, make_dose)
    base = mixed_indiv(len(pop), False)
    base.update(q=torch.full((len(pop),), 3.0), vp=torch.full((len(pop),), 40.0))
    model = TwoCmtOral()
    lam, _ = model.disposition(base)
    base["ka"] = lam[:, 0 if which == "alpha" else 1].clone()
    names = ["ka", "cl", "v", "q", "vp"]

    def f(*values):
        return model({**base, **dict(zip(names, values, strict=True))}, pop)

    inputs = tuple(base[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_cls", [OneCmtIV, OneCmtOral, TwoCmtIV, TwoCmtOral])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_nan_gradients_with_padding(model_cls, dtype, make_pop, make_dose):
    pop = mixed_population(make_pop, make_dose).to(dtype=dtype)
    pop.dose_cmt = pop.dose_cmt.clamp(max=len(model_cls.compartments))
    n = len(pop)
    base = mixed_indiv(n, True)
    base.update(q=torch.full((n,), 3.0), vp=torch.full((n,), 40.0))
    indiv = {k: v.to(dtype).requires_grad_(True) for k, v in base.items()}
    out = model_cls()(indiv, pop)
    assert out.dtype == dtype and torch.isfinite(out).all()
    (out**2).sum().backward()
    for name in model_cls.required + ("lag", "bioav"):
        assert torch.isfinite(indiv[name].grad).all(), name
    assert indiv["cl"].grad.abs().sum() > 0


@pytest.mark.parametrize("model_cls", [OneCmtOral, TwoCmtOral])
@pytest.mark.parametrize("ka_equals_k", [False, True])
def test_float32_matches_float64(model_cls, ka_equals_k, make_pop, make_dose):
    pop = mixed_population(make_pop, make_dose)
    n = len(pop)
    base = mixed_indiv(n, ka_equals_k)
    base.update(q=torch.full((n,), 3.0), vp=torch.full((n,), 40.0))
    ref = model_cls()(base, pop)
    out = model_cls()({k: v.float() for k, v in base.items()}, pop.to(dtype=torch.float32))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-4)


def _phi1_exact(x: Decimal) -> Decimal:
    return Decimal(1) if x == 0 else (1 - (-x).exp()) / x


def _phi2_exact(x: Decimal, y: Decimal) -> Decimal:
    if x == y:  # -phi1'(x)
        return Decimal(1) / 2 if x == 0 else (1 - (-x).exp() * (1 + x)) / (x * x)
    return (_phi1_exact(x) - _phi1_exact(y)) / (y - x)


def test_phi_functions_small_and_close_arguments():
    """phi1 / phi2 against 60-digit arithmetic, across the series/direct thresholds."""
    xs = [0.0, 1e-12, 1e-5, 9.99e-3, 1.001e-2, 0.24, 0.26, 2.0, 50.0, 800.0]
    pairs = [(0.0, 0.0), (1e-4, 2e-4), (0.0, 9.99e-3), (0.0, 1.001e-2), (5e-3, 0.3), (0.3, 0.3)]
    pairs += [(0.3, 0.3 + 1e-9), (0.5, 3.0), (5.0, 40.0), (30.0, 30.0), (700.0, 800.0)]
    with localcontext() as ctx:
        ctx.prec = 60
        expected1 = [float(_phi1_exact(Decimal(v))) for v in xs]
        expected = [float(_phi2_exact(Decimal(a), Decimal(b))) for a, b in pairs]
    torch.testing.assert_close(phi1(torch.tensor(xs)), torch.tensor(expected1), rtol=5e-16, atol=0)
    got = phi2(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=5e-14, atol=0)
    # float32 thresholds
    got32 = phi2(
        torch.tensor([a for a, _ in pairs]).float(), torch.tensor([b for _, b in pairs]).float()
    )
    torch.testing.assert_close(got32.double(), torch.tensor(expected), rtol=1e-6, atol=0)


def test_bioav_per_compartment(make_pop, make_dose):
    """bioav_depot scales depot doses only; IV doses into central keep F = 1."""
    pop = make_pop([{"doses": [make_dose(0.0, 100.0), make_dose(0.0, 40.0, cmt=2)], "obs": TIMES}])
    indiv = p(ka=1.0, cl=2.0, v=20.0)
    both = OneCmtOral()({**indiv, **p(bioav_depot=0.5)}, pop)
    oral = OneCmtOral()(indiv, make_pop([{"doses": [make_dose(0.0, 50.0)], "obs": TIMES}]))
    iv = OneCmtOral()(indiv, make_pop([{"doses": [make_dose(0.0, 40.0, cmt=2)], "obs": TIMES}]))
    torch.testing.assert_close(both, oral + iv, rtol=1e-13, atol=1e-12)


def test_rate_with_bioav_keeps_rate(make_pop, make_dose):
    """RATE > 0 with F: the rate is kept and the duration becomes F·AMT/RATE (NONMEM)."""
    pop = one_subject(make_pop, [make_dose(0.0, 100.0, rate=50.0)], times=[1.0, 1.5, 2.0, 5.0])
    out = OneCmtIV()({**p(cl=2.0, v=20.0), **p(bioav=0.5)}, pop)
    ref = OneCmtIV()(
        p(cl=2.0, v=20.0),
        one_subject(make_pop, [make_dose(0.0, 50.0, rate=50.0)], times=[1.0, 1.5, 2.0, 5.0]),
    )
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-12)


def test_errors(make_pop, make_dose):
    indiv = p(cl=2.0, v=20.0)
    pop = one_subject(make_pop, [make_dose(0.0, 100.0, rate=10.0, ss=1, ii=5.0, epoch=1)])
    with pytest.raises(ValueError, match="longer than its dosing interval"):
        OneCmtIV()(indiv, pop)
    with pytest.raises(ValueError, match="CMT out of range"):
        OneCmtIV()(indiv, one_subject(make_pop, [make_dose(0.0, 100.0, cmt=2)]))
    with pytest.raises(KeyError, match="duration"):
        OneCmtIV()(indiv, one_subject(make_pop, [make_dose(0.0, 100.0, rate=-2.0)]))
    with pytest.raises(KeyError, match="needs individual parameters"):
        OneCmtIV()(p(cl=2.0), one_subject(make_pop, [make_dose(0.0, 100.0)]))


@pytest.mark.parametrize("into_central", [False, True])
def test_amounts_by_name_match_forward(make_pop, make_dose, into_central):
    """``amounts(names)`` gives the compartments asked for (bolus-only: only those), equal to
    the slices of ``forward``; with an infusion every compartment comes from the general path."""
    doses = [make_dose(0.0, 100.0), make_dose(12.0, 50.0, cmt=2 if into_central else 0)]
    pop = one_subject(make_pop, doses)
    dyn = OneCmtOral()
    indiv = p(ka=1.3, cl=2.0, v=20.0)
    full = dyn(indiv, pop)
    central = dyn.amounts(indiv, pop, ("central",))
    assert list(central) == ["central"]
    torch.testing.assert_close(central["central"], full[..., 1], rtol=1e-14, atol=0.0)
    depot = dyn.amounts(indiv, pop, ("depot",))
    assert list(depot) == ["depot"]
    torch.testing.assert_close(depot["depot"], full[..., 0], rtol=1e-14, atol=0.0)
    infused = one_subject(make_pop, [make_dose(0.0, 100.0, rate=50.0)])
    both = dyn.amounts(indiv, infused, ("central",))
    assert list(both) == ["depot", "central"]
    torch.testing.assert_close(both["central"], dyn(indiv, infused)[..., 1])
