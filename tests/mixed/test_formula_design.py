"""lme4 formula syntax, lme4 column names, gathers instead of a dense Z, one-line errors."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from deepnlme.data.errors import DataValidationError
from deepnlme.mixed.design import build_design
from deepnlme.mixed.formula import FormulaError, parse_formula
from tests.mixed.conftest import design, table


def test_random_terms_expand_as_lme4():
    f = parse_formula("y ~ x + (x || g) + (1 | a/b) + (1 | a:c)")
    groups = [(r.group, r.expr.intercept, [t.variables for t in r.expr.terms]) for r in f.random]
    assert groups == [
        (("g",), True, []), (("g",), False, [("x",)]), (("a",), True, []),
        (("a", "b"), True, []), (("a", "c"), True, []),
    ]
    f = parse_formula("cbind(k, n - k) ~ a*b - 1 + (0 + x | g)")
    assert (f.response, f.trials, f.fixed.intercept) == ("k", "n", False)
    assert [t.variables for t in f.fixed.terms] == [("a",), ("b",), ("a", "b")]
    assert not f.random[0].expr.intercept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("y ~ x ~ z", "exactly one '~'"),
        ("y ~ (x | g", "unbalanced"),
        ("y ~ x + (x | g | h)", "expected (expr | group)"),
        ("cbind(k) ~ x", "cbind needs two arguments"),
        ("y ~ 2x", "expected a column name"),
    ],
)
def test_bad_formulas(text, message):
    with pytest.raises(FormulaError, match=re.escape(message)):
        parse_formula(text)


def test_fixed_effect_names_follow_lme4():
    d = design("cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)", ["period"])
    assert d.fixef_names == ["(Intercept)", "period2", "period3", "period4"]
    assert torch.equal(d.trials, torch.as_tensor(table("cbpp")["size"], dtype=torch.float64))
    t = pd.DataFrame({"y": [1.0, 2, 3, 4], "f": ["a", "b", "a", "b"], "x": [0.5, 1, 2, 3],
                      "g": [1, 1, 2, 2]})
    d = build_design(t, parse_formula("y ~ f*x + (1|g)"), "t")
    assert d.fixef_names == ["(Intercept)", "fb", "x", "fb:x"]
    np.testing.assert_allclose(d.X[:, 3].numpy(), [0, 1, 0, 3])
    d = build_design(t, parse_formula("y ~ 0 + f + (1|g)"), "t")
    assert d.fixef_names == ["fa", "fb"]


def test_random_design_is_gathers_sorted_by_levels():
    d = design("sleepstudy", "Reaction ~ Days + (Days|Subject)")
    (term,) = d.terms
    assert term.names == ["(Intercept)", "Days"] and term.n_levels == 18
    assert term.index.shape == (180,) and term.values.shape == (180, 2)
    rng = np.random.default_rng(0)
    t = table("sleepstudy").assign(g=rng.integers(0, 40, 180).astype(str))
    d = build_design(t, parse_formula("Reaction ~ Days + (1|Subject) + (1|Subject:g)"), "t")
    assert [x.group for x in d.terms] == ["Subject:g", "Subject"]


def test_bad_data_names_the_column():
    t = table("sleepstudy")
    with pytest.raises(DataValidationError, match=r"^sleep: column Dayz: not in the table"):
        build_design(t, parse_formula("Reaction ~ Dayz + (1|Subject)"), "sleep")
    with pytest.raises(
        DataValidationError, match=r"^sleep: column one: grouping factor has only one level"
    ):
        build_design(t.assign(one="a"), parse_formula("Reaction ~ Days + (1|one)"), "sleep")
    t.loc[6, "Days"] = np.nan
    with pytest.raises(DataValidationError, match=r"^sleep: row 7, column Days: missing value$"):
        build_design(t, parse_formula("Reaction ~ Days + (1|Subject)"), "sleep")
