"""Steps shared by the commands that reuse a fit (``predict.py``, ``simulate.py``).

Both reload a checkpoint safely (:meth:`FittedModel.load`: plain data only) and apply it to
a population: the ``data=...`` of the command line, else the checkpoint's training data (all
its subjects, held-out ones included). Problems a user can fix are raised as
:class:`~deepnlme.training.build.SetupError` or
:class:`~deepnlme.data.errors.DataValidationError` (one line on stderr, exit status 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from deepnlme.data.population import Population
from deepnlme.fitted import FittedModel
from deepnlme.training import build


def load_fitted(ckpt_path: str, trusted_modules: Sequence[str] = ()) -> FittedModel:
    """:meth:`FittedModel.load`, with unusable files reported as a :class:`SetupError`.

    ``trusted_modules``: the user's modules whose classes the checkpoint may name (besides
    ``deepnlme``); no other module is imported.
    """
    try:
        return FittedModel.load(ckpt_path, trusted_modules=trusted_modules)
    except (OSError, ValueError) as exc:
        raise build.SetupError(f"cannot load checkpoint {exc}") from exc


def trusted_module_names(cfg: DictConfig) -> list[str]:
    """The config's ``trusted_modules`` (a list of module names; a single name is accepted)."""
    value = cfg.get("trusted_modules") or []
    names = [value] if isinstance(value, str) else [str(m) for m in value]
    bad = [m for m in names if not all(part.isidentifier() for part in m.split("."))]
    if bad:
        raise build.SetupError(f"trusted_modules: {bad} are not module names (e.g. mymodels)")
    return names


def load_subjects(cfg: DictConfig, fitted: FittedModel) -> tuple[Population, str]:
    """``(population, data name)`` a command applies ``fitted`` to.

    ``cfg.data`` when given, else the checkpoint's training data config; no subjects are held
    out, and an empty ``covariates`` list means the covariates the model was trained with.
    The population is in the fit's dtype and checked against the model (covariates, CMT).
    """
    data = build.plain(cfg.data) if cfg.get("data") is not None else dict(fitted.config["data"])
    covariates = data.get("covariates") or fitted.covariate_names
    data = {**data, "heldout_fraction": 0.0, "covariates": covariates}
    pop, _ = build.load_data(data, fitted.dtype)
    build.check_data(fitted.model, pop)
    return pop, str(data["name"])


def load_run(cfg: DictConfig) -> tuple[FittedModel, Population, dict[str, str]]:
    """The checkpoint ``cfg.ckpt_path``, the subjects to apply it to (:func:`load_subjects`)
    and the head of the command's results.json (model/method/data names, ``ckpt_path``)."""
    build.set_threads(cfg)
    fitted = load_fitted(str(cfg.ckpt_path), trusted_module_names(cfg))
    pop, data_name = load_subjects(cfg, fitted)
    return fitted, pop, {**fitted.names, "data": data_name, "ckpt_path": str(cfg.ckpt_path)}
