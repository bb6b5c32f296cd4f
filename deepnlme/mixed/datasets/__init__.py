"""Bundled tables for formula models.

* ``insteval``: lme4's ``InstEval`` (73,421 course ratings ``y`` 1–5 by 2,972 students ``s`` of
  1,128 lecturers ``d`` in 14 departments ``dept``; ``service`` 0/1, ``studage``, ``lectage``),
  exported from R (lme4 1.1-31) with the factor codes as integers.
"""

from __future__ import annotations

from pathlib import Path

TABLES = {"insteval": "insteval.csv.gz"}


def table_path(name: str) -> Path:
    """Path of the bundled table ``name``; unknown names raise ValueError."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; available: {', '.join(sorted(TABLES))}")
    return Path(__file__).with_name(TABLES[name])
