"""A fitted formula model as plain data (checkpoint) and its predictions for new rows.

The checkpoint (``torch.save`` of plain dicts/lists, loaded with ``weights_only=True``) holds
the formula, the categorical columns' levels, the estimates and every level's conditional
mode, so that ``predict.py`` can encode and predict any table with the formula's columns.
Levels of a grouping factor not seen in the fit get random effect 0 (population prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from deepnlme.mixed import families
from deepnlme.mixed.design import MixedDesign, RandomTerm, Schema, encode_new
from deepnlme.mixed.formula import parse_formula
from deepnlme.mixed.result import MixedFit

#: Key of the formula-model entry in a checkpoint.
CHECKPOINT_KEY = "deepnlme_mixed"
FORMAT_VERSION = 1


@dataclass
class FittedMixed:
    """Plain-data state of a fit (see :meth:`state`) with prediction."""

    formula_text: str
    family: str
    link: str
    factor_levels: dict[str, list[str]]
    fixef: dict[str, float]
    thresholds: list[float] | None
    categories: list[float] | None
    sigma: float | None
    terms: list[dict[str, Any]]
    config: dict[str, Any]

    @classmethod
    def from_fit(cls, fit: MixedFit, design: MixedDesign, config: dict[str, Any]) -> FittedMixed:
        specs = list(design.formula.random)
        terms = []
        for t, m in zip(design.terms, fit.modes, strict=True):
            terms.append(
                {
                    "group": t.group,
                    "spec_index": specs.index(
                        next(s for s in specs if s.expr == t.spec and s.group == t.group_columns)
                    ),
                    "names": list(t.names),
                    "levels": list(t.levels),
                    "mode": m.mode.tolist(),
                    "sd": m.sd.tolist(),
                }
            )
        return cls(
            design.formula.text,
            fit.family,
            fit.link,
            dict(design.schema.factor_levels),
            dict(fit.fixef),
            fit.thresholds,
            fit.extra.get("categories"),
            fit.sigma,
            terms,
            config,
        )

    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
        }

    def save(self, path: str | Path, into_existing: bool = False) -> Path:
        """Write the checkpoint; ``into_existing``: add the entry to the training checkpoint
        already at ``path`` (a fit run through Lightning: it stays resumable)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {}
        if into_existing and path.exists():
            data = torch.load(path, map_location="cpu", weights_only=True)
        data[CHECKPOINT_KEY] = self.state()
        torch.save(data, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FittedMixed:
        data = torch.load(path, map_location="cpu", weights_only=True)
        state = dict(data[CHECKPOINT_KEY])
        if state.pop("format", None) != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported formula-model checkpoint format")
        return cls(**state)

    def _terms(self) -> list[RandomTerm]:
        formula = parse_formula(self.formula_text)
        out = []
        for t in self.terms:
            spec = formula.random[t["spec_index"]]
            empty = torch.zeros(0, dtype=torch.long)
            out.append(
                RandomTerm(
                    t["group"],
                    t["names"],
                    t["levels"],
                    empty,
                    torch.zeros(0, len(t["names"])),
                    spec.expr,
                    spec.group,
                )
            )
        return out

    def linear_predictor(
        self, table: pd.DataFrame, source: str, conditional: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(η with the conditional modes, observed response or None, population η)``."""
        formula = parse_formula(self.formula_text)
        X, names, values, indices, y = encode_new(
            formula, Schema(self.factor_levels), self._terms(), table, source
        )
        cols = [names.index(n) for n in self.fixef]
        beta = torch.as_tensor(list(self.fixef.values()), dtype=torch.float64)
        eta_pop = X[:, cols] @ beta
        eta = eta_pop.clone()
        for t, v, idx in zip(self.terms, values, indices, strict=True):
            b = torch.as_tensor(np.asarray(t["mode"]), dtype=torch.float64)
            b = torch.cat([b, torch.zeros(1, b.shape[1], dtype=b.dtype)])  # row -1: unseen
            eta = eta + (v * b[idx]).sum(-1)
        if self.family == "ordinal" and y is not None:
            y = torch.searchsorted(torch.as_tensor(self.categories, dtype=y.dtype), y).to(y.dtype)
        return eta, y, eta_pop

    def predict(self, table: pd.DataFrame, source: str) -> pd.DataFrame:
        """Per row: ``pred`` (expected response with the conditional modes), ``pred_pop``
        (random effects 0), and ``y``/``residual`` when the table has the response (binomial:
        probabilities and observed proportions; ordinal: expected rating and the category
        probabilities)."""
        eta, y, eta_pop = self.linear_predictor(table, source)
        out = pd.DataFrame({"row": np.arange(1, len(table) + 1)})
        for name, e in (("pred", eta), ("pred_pop", eta_pop)):
            out[name] = self.mean(e).numpy()
        if self.family == "ordinal":
            probs = families.category_probabilities(
                self.link, eta, torch.as_tensor(self.thresholds, dtype=torch.float64)
            )
            for j, c in enumerate(self.categories):
                out[f"prob_{c:g}"] = probs[:, j].numpy()
        if y is not None:
            observed = (
                y
                if self.family != "ordinal"
                else torch.as_tensor(self.categories, dtype=torch.float64)[y.long()]
            )
            out["y"] = observed.numpy()
            formula = parse_formula(self.formula_text)
            if self.family == "binomial" and (formula.trials or formula.failures):
                trials = (
                    table[formula.trials] if formula.trials
                    else table[formula.response] + table[formula.failures]
                )
                out["y"] = out["y"] / trials.to_numpy(dtype=float)  # observed proportion
            out["residual"] = out["y"] - out["pred"]
        return out

    def mean(self, eta: torch.Tensor) -> torch.Tensor:
        """Expected response on the response's scale (ordinal: expected rating value)."""
        if self.family == "gaussian":
            return eta
        if self.family == "ordinal":
            probs = families.category_probabilities(
                self.link, eta, torch.as_tensor(self.thresholds, dtype=torch.float64)
            )
            return probs @ torch.as_tensor(self.categories, dtype=torch.float64)
        return families.mean(self.family, self.link, eta)


def heldout_metrics(predictions: pd.DataFrame, unseen: int) -> dict[str, float]:
    """RMSE/MAE of the conditional and population predictions of held-out rows."""
    res = predictions["y"] - predictions["pred"]
    res_pop = predictions["y"] - predictions["pred_pop"]
    return {
        "n_obs": int(len(predictions)),
        "rmse": float(np.sqrt(np.mean(res**2))),
        "mae": float(np.mean(np.abs(res))),
        "rmse_population": float(np.sqrt(np.mean(res_pop**2))),
        "n_rows_with_unseen_levels": int(unseen),
    }
