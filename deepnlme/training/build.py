"""Hydra config -> objects (the only place in the package that instantiates from configs).

Used by ``train.py`` and ``predict.py``. Problems a user can fix from the command line (bad
data, a model that does not fit the data, an unknown parameter or class) are raised as
:class:`~deepnlme.data.errors.DataValidationError` or :class:`SetupError`, whose message is one
line; :func:`exit_on_user_error` turns them into that line on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from deepnlme.data.errors import DataValidationError
from deepnlme.data.population import Population
from deepnlme.data.sources import load_from_config, load_heldout_regimen
from deepnlme.data.split import split_heldout
from deepnlme.fitted import check_model_data, default_dtype, import_object
from deepnlme.inference.optimize import OuterOptions
from deepnlme.model.base import NLMEModel
from deepnlme.training.callbacks import FitProgressBar

log = logging.getLogger(__name__)

#: Fewer L-BFGS iterations per step leave its line search no evaluations to work with.
MIN_ITERATIONS_PER_EPOCH = 4
#: Keys of a model config handled by the model base class (whatever the class's signature).
BASE_MODEL_KEYS = ("init", "fixed")


class SetupError(Exception):
    """A run cannot start: bad configuration, or model and data do not fit together."""


def _message(exc: BaseException) -> str:
    """One line describing ``exc`` (the cause of Hydra's wrapper exceptions)."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Print user errors as one line on stderr and exit with status 1 (no traceback)."""
    try:
        yield
    except (DataValidationError, SetupError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def open_init_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with ``model.init.NAME=V`` turned into ``++model.init.NAME=V``.

    ``model.init`` is an open dict of initial estimates (``{}`` in the configs); Hydra would
    otherwise ask for ``+`` to add a key to it.
    """
    return [f"++{a}" if a.startswith("model.init.") else a for a in args]


def plain(config: DictConfig | Mapping) -> dict[str, Any]:
    """Resolved config as plain dicts/lists."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


def precision_dtype(precision: Any) -> torch.dtype:
    """Floating dtype of the data and model for a Lightning ``precision`` setting."""
    return torch.float64 if str(precision).startswith("64") else torch.float32


# --------------------------------------------------------------------------------------- data
def load_data(
    data_cfg: DictConfig | Mapping, dtype: torch.dtype
) -> tuple[Population, Population | None]:
    """``(fit subjects, held-out subjects or None)`` from a data config (split keys included)."""
    config = plain(data_cfg)
    fraction = float(config.get("heldout_fraction") or 0.0)
    try:
        pop = load_from_config(config, dtype=dtype)
        if fraction <= 0:
            return pop, None
        return split_heldout(pop, fraction, int(config.get("split_seed") or 0))
    except DataValidationError:
        raise
    except (ValueError, TypeError, ImportError, OSError) as exc:
        raise SetupError(f"data {config.get('name')!r}: {_message(exc)}") from exc


def load_regimen_data(data_cfg: DictConfig | Mapping, dtype: torch.dtype) -> Population | None:
    """The data config's held-out regimen (``heldout_regimen``), or None."""
    config = plain(data_cfg)
    try:
        return load_heldout_regimen(config, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise SetupError(f"data {config.get('name')!r}: {_message(exc)}") from exc


# -------------------------------------------------------------------------------------- model
def model_arguments(model_cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The model config with only the arguments its ``_target_`` accepts.

    A config group's class-specific keys (e.g. ``error``) are dropped, with a warning, when
    ``model._target_`` names a class that does not take them; ``init``/``fixed`` always stay.
    """
    config = plain(model_cfg)
    target = config.get("_target_")
    if not target:
        raise SetupError("model config needs a _target_ (the model class, module.Class)")
    try:
        cls = import_object(target)
    except (ImportError, AttributeError) as exc:
        raise SetupError(f"cannot import model class {target!r}: {_message(exc)}") from exc
    if not (isinstance(cls, type) and issubclass(cls, NLMEModel)):
        raise SetupError(f"model._target_ {target!r} is not a deepnlme NLMEModel subclass")
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return config
    accepted = {p.name for p in parameters} | set(BASE_MODEL_KEYS)
    dropped = [k for k in config if not k.startswith("_") and k not in accepted]
    if dropped:
        log.warning("%s takes no argument(s) %s; ignored", target, dropped)
    return {k: v for k, v in config.items() if k not in dropped}


def build_model(model_cfg: DictConfig | Mapping, dtype: torch.dtype) -> tuple[NLMEModel, dict]:
    """``(model, the arguments it was built with)``; parameters are created in ``dtype``."""
    config = model_arguments(model_cfg)
    try:
        with default_dtype(dtype):
            model = instantiate(config, _convert_="all")
    except (InstantiationException, KeyError, ValueError, TypeError) as exc:
        raise SetupError(f"model {config['_target_']}: {_message(exc)}") from exc
    return model, config


def check_data(model: NLMEModel, pop: Population) -> None:
    """Raise if ``pop`` lacks a covariate of ``model`` or uses a compartment it does not have."""
    try:
        check_model_data(model, pop)
    except DataValidationError:
        raise
    except ValueError as exc:
        raise SetupError(_message(exc)) from exc


# ------------------------------------------------------------------------------------- method
def build_estimator(method_cfg: DictConfig | Mapping, model: NLMEModel) -> Any:
    """The method's ``estimator`` node instantiated for ``model``."""
    config = plain(method_cfg)["estimator"]
    try:
        return instantiate(config, model=model, _convert_="all")
    except InstantiationException as exc:
        raise SetupError(f"method estimator: {_message(exc)}") from exc


def outer_options(method_cfg: DictConfig | Mapping) -> tuple[OuterOptions, int]:
    """``(L-BFGS options, iterations per epoch)`` from a method config."""
    config = plain(method_cfg)
    per_epoch = int(config["iterations_per_epoch"])
    if per_epoch < MIN_ITERATIONS_PER_EPOCH:
        raise SetupError(
            f"method.iterations_per_epoch must be >= {MIN_ITERATIONS_PER_EPOCH} (got {per_epoch}): "
            "L-BFGS allows 1.25 function evaluations per iteration in each epoch's step"
        )
    options = OuterOptions(
        max_iter=int(config["max_iter"]),
        gtol=float(config["gtol"]),
        converged_gtol=float(config["converged_gtol"]),
        lr=float(config["lr"]),
    )
    return options, per_epoch


# ------------------------------------------------------------------------------------ trainer
class _NoAdvertisements(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." notes from a fit's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Keep Lightning's product tips and its internal deprecation notice out of fit output."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisements) for f in logger.filters):
        logger.addFilter(_NoAdvertisements())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def build_trainer(
    trainer_cfg: DictConfig | Mapping, output_dir: str | Path, callbacks: list
) -> pl.Trainer:
    """The Lightning Trainer of the config, writing under ``output_dir``.

    Adds to ``callbacks`` a checkpoint of every epoch at ``output_dir/checkpoints/last.ckpt``
    and, when the progress bar is enabled, :class:`FitProgressBar`.
    """
    quiet_lightning()
    config = plain(trainer_cfg)
    checkpoints = ModelCheckpoint(
        dirpath=Path(output_dir) / "checkpoints", save_last=True, save_top_k=0, every_n_epochs=1
    )
    extra = [checkpoints]
    if config.get("enable_progress_bar", True):
        extra.append(FitProgressBar())
    return instantiate(config, callbacks=[*callbacks, *extra], default_root_dir=str(output_dir))


def run_names(cfg: DictConfig, model: NLMEModel, estimator: Any) -> dict[str, str]:
    """``model`` (the config group option, or the class name when ``model._target_`` was
    overridden), ``model_class`` (dotted path), ``method`` (estimator name), ``data``."""
    cls = type(model)
    return {
        "model": _model_choice() or cls.__name__,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "method": str(getattr(estimator, "name", "")),
        "data": str(cfg.data.name),
    }


def _model_choice() -> str | None:
    """The ``model`` config option of this Hydra run, unless its ``_target_`` was overridden."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if any(o.lstrip("+~").startswith("model._target_=") for o in hydra_cfg.overrides.task):
        return None
    return hydra_cfg.runtime.choices.get("model")


def set_threads(cfg: DictConfig | Mapping) -> None:
    """Apply the config's ``threads`` (torch CPU threads; null keeps torch's default)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def run_command(step: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> None:
    """Body of the command-line shims: ``step(cfg, run_dir)`` with the working directory
    importable (users' model modules: ``model._target_=mymodule.MyModel``) and user errors
    reported as one line without a traceback."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    with exit_on_user_error():
        step(cfg, Path(HydraConfig.get().runtime.output_dir))
