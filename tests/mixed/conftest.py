"""Shared helpers of the formula-model tests: the small R tables shipped in ``data/``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from deepnlme.mixed.design import build_design
from deepnlme.mixed.formula import parse_formula

DATA = Path(__file__).with_name("data")


def table(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / f"{name}.csv")


def design(name: str, formula: str, factors=()):
    return build_design(table(name), parse_formula(formula), name, factors=factors)


@pytest.fixture(autouse=True)
def one_thread():
    """These fits run many small batched operations: one thread (as train.py's default)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
