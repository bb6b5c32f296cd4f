"""Formula + table -> model matrices: dense fixed-effects X, random effects as gather indices.

The random-effects design is never a dense N×q matrix: each random term ``k`` is stored as the
level of its grouping factor for every row (``index``, ``(N,)``) and the row's raw covariate
values for the term's columns (``values``, ``(N, p_k)``, e.g. ``[1, Days]``). Names follow
lme4: ``(Intercept)``, numeric ``x``, factor levels ``f2`` (treatment contrasts: first level
dropped when there is an intercept), interactions ``a:b``. Text columns, grouping factors,
``factor(x)`` and the table's declared ``factors`` are categorical; their levels are sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from deepnlme.data.errors import DataValidationError
from deepnlme.mixed.formula import Formula, TermsSpec


@dataclass
class RandomTerm:
    """One random-effects term ``(expr | group)``.

    Attributes:
        group: grouping factor label (``"s"``, ``"a:b"``).
        names: the term's column names (``["(Intercept)", "Days"]``), ``p_k`` of them.
        levels: level labels of the grouping factor (``n_k`` of them, sorted).
        index: ``(N,)`` long, each row's level.
        values: ``(N, p_k)`` the row's raw values of the term's columns.
        spec: the term's expression (to encode new rows).
        group_columns: the table columns forming the grouping factor.
    """

    group: str
    names: list[str]
    levels: list[str]
    index: torch.Tensor
    values: torch.Tensor
    spec: TermsSpec
    group_columns: tuple[str, ...]

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def size(self) -> int:
        return len(self.names)


@dataclass
class Schema:
    """What encoding new rows needs: factor levels per categorical column, numeric columns."""

    factor_levels: dict[str, list[str]] = field(default_factory=dict)

    def is_factor(self, name: str) -> bool:
        return name in self.factor_levels


@dataclass
class MixedDesign:
    """Model matrices of a formula model on one table (float64 unless told otherwise).

    Attributes:
        y: ``(N,)`` response (successes for binomial).
        trials: ``(N,)`` binomial trials, or None.
        X: ``(N, p)`` fixed-effects design; ``fixef_names`` its lme4 column names.
        terms: random terms sorted by number of levels, largest first (as lme4).
        rows: the table's 1-based data row of every design row.
    """

    formula: Formula
    y: torch.Tensor
    trials: torch.Tensor | None
    X: torch.Tensor
    fixef_names: list[str]
    terms: list[RandomTerm]
    schema: Schema
    rows: np.ndarray

    @property
    def n_obs(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> MixedDesign:
        for term in self.terms:
            term.index = term.index.to(device)
            term.values = term.values.to(device)
        self.y, self.X = self.y.to(device), self.X.to(device)
        if self.trials is not None:
            self.trials = self.trials.to(device)
        return self


def _level_labels(values: pd.Series) -> list[str]:
    uniq = pd.unique(values)
    if pd.api.types.is_numeric_dtype(values):
        uniq = np.sort(uniq)
        return [_label(v) for v in uniq]
    return sorted(str(v) for v in uniq)


def _label(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _as_labels(values: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values):
        return values.map(_label)
    return values.astype(str)


def make_schema(table: pd.DataFrame, formula: Formula, factors: Sequence[str] = ()) -> Schema:
    """Which formula columns are categorical, and their levels in ``table``."""
    forced = set(factors) | set(formula.fixed.forced_factors)
    for r in formula.random:
        forced |= set(r.expr.forced_factors)
        forced |= set(r.group)
    schema = Schema()
    skip = {formula.response, formula.trials, formula.failures}
    for name in formula.variables:
        if name in skip:
            continue
        col = table[name]
        if name in forced or not pd.api.types.is_numeric_dtype(col) or col.dtype == bool:
            schema.factor_levels[name] = _level_labels(col)
    return schema


def model_matrix(
    spec: TermsSpec, table: pd.DataFrame, schema: Schema, source: str
) -> tuple[np.ndarray, list[str]]:
    """``(N, p)`` design of ``spec`` on ``table`` and lme4's column names."""
    n = len(table)
    columns: list[np.ndarray] = []
    names: list[str] = []
    if spec.intercept:
        columns.append(np.ones(n))
        names.append("(Intercept)")
    full_coding_used = spec.intercept
    for term in spec.terms:
        parts: list[tuple[list[np.ndarray], list[str]]] = []
        for var in term.variables:
            if schema.is_factor(var):
                levels = schema.factor_levels[var]
                labels = _as_labels(table[var]).to_numpy()
                unknown = sorted(set(labels) - set(levels))
                if unknown:
                    raise DataValidationError(
                        f"{source}: column {var}: level(s) {unknown[:5]} not seen in the fit"
                    )
                keep = levels if not full_coding_used else levels[1:]
                full_coding_used = True
                parts.append(
                    (
                        [(labels == lev).astype(float) for lev in keep],
                        [f"{var}{lev}" for lev in keep],
                    )
                )
            else:
                parts.append(([table[var].to_numpy(dtype=float)], [var]))
        cols, labs = parts[0]
        for more_cols, more_labs in parts[1:]:
            cols = [a * b for a in cols for b in more_cols]
            labs = [f"{a}:{b}" for a in labs for b in more_labs]
        columns += cols
        names += labs
    matrix = np.stack(columns, axis=1) if columns else np.zeros((n, 0))
    return matrix, names


def check_table(table: pd.DataFrame, formula: Formula, source: str) -> None:
    """Raise :class:`DataValidationError` for unknown or incomplete formula columns."""
    for name in formula.variables:
        if name not in table.columns:
            raise DataValidationError(
                f"{source}: column {name}: not in the table (formula {formula.text!r}; "
                f"columns: {', '.join(map(str, table.columns))})"
            )
        missing = table[name].isna().to_numpy()
        if missing.any():
            row = int(np.argmax(missing)) + 1
            raise DataValidationError(f"{source}: row {row}, column {name}: missing value")


def group_labels(table: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """Each row's level label of the grouping factor ``a:b:...`` (labels joined by ':')."""
    labels = _as_labels(table[columns[0]])
    for name in columns[1:]:
        labels = labels + ":" + _as_labels(table[name])
    return labels


def build_design(
    table: pd.DataFrame,
    formula: Formula,
    source: str,
    factors: Sequence[str] = (),
    dtype: torch.dtype = torch.float64,
) -> MixedDesign:
    """:class:`MixedDesign` of ``formula`` on ``table`` (``source`` names the table in errors).

    Raises:
        DataValidationError: unknown or incomplete column, non-numeric response, grouping
            factor with one level (the message names the column).
    """
    check_table(table, formula, source)
    schema = make_schema(table, formula, factors)
    y = _numeric(table, formula.response, source)
    trials = None
    if formula.trials:
        trials = _numeric(table, formula.trials, source)
    elif formula.failures:
        trials = y + _numeric(table, formula.failures, source)
    X, fixef_names = model_matrix(formula.fixed, table, schema, source)
    terms = []
    for spec in formula.random:
        labels = group_labels(table, spec.group)
        levels = (
            _level_labels(labels) if len(spec.group) > 1 else schema.factor_levels[spec.group[0]]
        )
        if len(levels) < 2:
            raise DataValidationError(
                f"{source}: column {spec.group_label}: grouping factor has only one level "
                f"({levels[0]!r}); a random effect needs at least two"
            )
        code = pd.Categorical(labels, categories=levels).codes
        values, names = model_matrix(spec.expr, table, schema, source)
        terms.append(
            RandomTerm(
                spec.group_label,
                names,
                levels,
                torch.as_tensor(np.array(code), dtype=torch.long),
                torch.as_tensor(values, dtype=dtype),
                spec.expr,
                spec.group,
            )
        )
    terms.sort(key=lambda t: -t.n_levels)
    return MixedDesign(
        formula,
        torch.as_tensor(y, dtype=dtype),
        None if trials is None else torch.as_tensor(trials, dtype=dtype),
        torch.as_tensor(X, dtype=dtype),
        fixef_names,
        terms,
        schema,
        np.arange(1, len(table) + 1),
    )


def encode_new(
    formula: Formula,
    schema: Schema,
    terms: Sequence[RandomTerm],
    table: pd.DataFrame,
    source: str,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, list[str], list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """New rows in a fit's coding: ``(X, X names, [values_k], [index_k], y or None)``.

    A level of a grouping factor not seen in the fit gets index ``-1`` (its random effect is
    0: the population prediction). The response is read when the table has it.
    """
    skip = {formula.response, formula.trials, formula.failures}
    needed = [v for v in formula.variables if v not in skip]
    check_table(table, _only(formula, needed), source)
    X, names = model_matrix(formula.fixed, table, schema, source)
    values, indices = [], []
    for term in terms:
        vals, _ = model_matrix(term.spec, table, schema, source)
        lookup = {lev: i for i, lev in enumerate(term.levels)}
        labels = group_labels(table, term.group_columns)
        indices.append(torch.as_tensor([lookup.get(s, -1) for s in labels], dtype=torch.long))
        values.append(torch.as_tensor(vals, dtype=dtype))
    y = None
    if formula.response in table.columns and not table[formula.response].isna().any():
        y = torch.as_tensor(_numeric(table, formula.response, source), dtype=dtype)
    return torch.as_tensor(X, dtype=dtype), names, values, indices, y


def _only(formula: Formula, names: Sequence[str]) -> Formula:
    from dataclasses import replace

    return replace(formula, variables=tuple(names))


def _numeric(table: pd.DataFrame, name: str, source: str) -> np.ndarray:
    col = table[name]
    if not pd.api.types.is_numeric_dtype(col) or col.dtype == bool:
        bad = next(i for i, v in enumerate(col) if not _is_number(v))
        raise DataValidationError(
            f"{source}: row {bad + 1}, column {name}: the response must be numeric "
            f"(got {col.iloc[bad]!r})"
        )
    return np.array(col.to_numpy(dtype=float))


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
