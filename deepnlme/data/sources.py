"""Data configuration -> :class:`Population`: one entry point for every kind of data source.

A data source is named by ``name``:

* ``"csv"``: a NONMEM-style event table at ``path`` (:func:`~deepnlme.data.load_population`);
* a bundled dataset (``"theophylline"``, ``"phenobarbital"``; :func:`~deepnlme.data.load_dataset`);
* ``"synthetic_pk"``: :func:`deepnlme.data.synthetic.synthetic_pk`, called with the source's
  extra keyword arguments (e.g. ``n_subjects``, ``seed``).

``covariates`` lists the covariate columns to keep (in that order); for the synthetic source an
empty list keeps all of them. Plain Python only: no Hydra, no devices.

Importing this module does not load torch: :func:`read_from_config` reads and checks a CSV
source's table with pandas alone, before torch loads (start-up time of data errors), and
:func:`load_from_config` builds the tensors from that table without reading the file again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from deepnlme.data.events import EventTable, read_event_table

if TYPE_CHECKING:
    import torch

    from deepnlme.data.population import Population

#: Keys of a data config that describe the train/held-out split, the held-out regimen and the
#: minibatches, not the source.
SPLIT_KEYS = ("heldout_fraction", "split_seed", "heldout_regimen", "batch_subjects")
SYNTHETIC = ("synthetic_pk",)


def source_names() -> list[str]:
    """Every accepted ``name``."""
    from deepnlme.data.datasets import DATASETS

    return ["csv", *sorted(DATASETS), *SYNTHETIC]


def select_covariates(pop: Population, names: Sequence[str]) -> Population:
    """Keep only the covariates ``names`` (in that order); ``(N, C)`` -> ``(N, len(names))``.

    Raises:
        ValueError: a name is not a covariate of ``pop``.
    """
    missing = [n for n in names if n not in pop.covariate_names]
    if missing:
        raise ValueError(
            f"{pop.source or 'the data'} has no covariate(s) {missing}; "
            f"available: {pop.covariate_names}"
        )
    index = [pop.covariate_names.index(n) for n in names]
    return replace(
        pop,
        covariate_names=list(names),
        covariates=pop.covariates[:, index],
        obs_covariates=pop.obs_covariates[..., index],
    )


def read_source(
    name: str, path: str | None = None, covariates: Sequence[str] = (), **extra: Any
) -> EventTable | None:
    """The validated event table of a ``"csv"`` source (pandas only, no torch); None for the
    other sources (bundled and synthetic data are checked when :func:`load_source` builds them).

    Raises:
        DataValidationError: the table is unusable (message names file, row and column).
        ValueError: missing ``path`` or unknown keys.
    """
    if name != "csv":
        return None
    if extra:
        raise ValueError(f"data source {name!r} takes no options {sorted(extra)}")
    if not path:
        raise ValueError("data source 'csv' needs a file: set data.path=FILE.csv")
    return read_event_table(path, covariates=[str(c) for c in covariates])


def load_source(
    name: str,
    path: str | None = None,
    covariates: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    *,
    table: EventTable | None = None,
    **extra: Any,
) -> Population:
    """Load the data source ``name`` as a :class:`Population` (all subjects, float ``dtype``).

    ``table``: the source's table as :func:`read_source` returned it (a ``"csv"`` source is
    then built from it, not read again).

    Raises:
        DataValidationError: the table is unusable (message names file, row and column).
        ValueError: unknown ``name``, missing ``path``, unknown keys or covariates.
    """
    covariates = [str(c) for c in covariates]
    if name in SYNTHETIC:
        from deepnlme.data.synthetic import synthetic_pk

        pop = synthetic_pk(dtype=dtype, **extra)
        return select_covariates(pop, covariates) if covariates else pop
    if name == "csv":
        from deepnlme.data.build import build_population

        if table is None:
            table = read_source(name, path, covariates, **extra)
        return build_population(table, dtype=dtype)
    if extra:
        raise ValueError(f"data source {name!r} takes no options {sorted(extra)}")
    from deepnlme.data.datasets import DATASETS, load_dataset

    if name in DATASETS:
        return load_dataset(name, dtype=dtype, covariates=covariates)
    raise ValueError(f"unknown data source {name!r}; available: {', '.join(source_names())}")


def _source_options(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, the source's other keys)`` of a data config (split keys left out)."""
    options = {k: v for k, v in config.items() if k not in SPLIT_KEYS}
    name = options.pop("name", None)
    if name is None:
        raise ValueError(f"data config needs a 'name' (one of {', '.join(source_names())})")
    return str(name), options


def read_from_config(config: Mapping[str, Any]) -> EventTable | None:
    """:func:`read_source` from a data config mapping (split keys are ignored here)."""
    name, options = _source_options(config)
    return read_source(name, **options)


def load_from_config(
    config: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    table: EventTable | None = None,
) -> Population:
    """:func:`load_source` from a data config mapping (split keys are ignored here); ``table``
    as :func:`read_from_config` returned it for the same config."""
    name, options = _source_options(config)
    return load_source(name, dtype=dtype, table=table, **options)


def load_heldout_regimen(
    config: Mapping[str, Any], dtype: torch.dtype | None = None
) -> Population | None:
    """The held-out regimen of a data config (``heldout_regimen``: options of
    :func:`~deepnlme.data.synthetic.synthetic_pk_regimen`, the source's ``seed`` and
    ``covariates`` applied), or None when the config has none.

    Raises:
        ValueError: a held-out regimen for a source that has none, or unknown options.
    """
    options = config.get("heldout_regimen")
    if not options:
        return None
    name = config.get("name")
    if name not in SYNTHETIC:
        raise ValueError(
            f"heldout_regimen is only available for data={SYNTHETIC[0]} (got data {name!r}); "
            "evaluate other regimens with predict.py on their own file"
        )
    from deepnlme.data.synthetic import synthetic_pk_regimen

    options = dict(options)
    unknown = sorted(set(options) - {"n_subjects"})
    if unknown:
        raise ValueError(f"heldout_regimen takes only n_subjects, got {unknown}")
    pop = synthetic_pk_regimen(
        n_subjects=int(options.get("n_subjects", 50)), seed=int(config.get("seed", 0)), dtype=dtype
    )
    covariates = [str(c) for c in config.get("covariates") or ()]
    return select_covariates(pop, covariates) if covariates else pop
