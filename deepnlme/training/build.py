"""Hydra config -> objects (the only place in the package that instantiates from configs).

Used by ``train.py``, ``predict.py`` and ``simulate.py``. Problems a user can fix from the
command line (bad data, a model that does not fit the data, an unknown parameter or class) are
raised as :class:`~deepnlme.data.errors.DataValidationError` or :class:`SetupError`, whose
message is one line; :func:`exit_on_user_error` turns them into that line on stderr and exit
status 1 (both live in :mod:`deepnlme.cli`).

Importing this module loads torch and the data layer, not Lightning nor the models: a command
reads and checks its data before the rest loads (start-up time of data errors).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from deepnlme.cli import (  # noqa: F401  (the commands' names for these, re-exported)
    SetupError,
    exit_on_user_error,
    open_init_overrides,
    run_command,
)
from deepnlme.cli import one_line as _message
from deepnlme.data.errors import DataValidationError
from deepnlme.data.events import EventTable
from deepnlme.data.population import Population
from deepnlme.data.sources import load_from_config, load_heldout_regimen
from deepnlme.data.split import split_heldout
from deepnlme.training.data_source import data_errors, plain

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from deepnlme.inference.optimize import OuterOptions
    from deepnlme.model.base import NLMEModel

if TYPE_CHECKING:
    from deepnlme.diagnostics.write import DiagnosticOptions

log = logging.getLogger(__name__)

#: Fewer L-BFGS iterations per step leave its line search no evaluations to work with.
MIN_ITERATIONS_PER_EPOCH = 4
#: Keys of a model config handled by the model base class (whatever the class's signature).
BASE_MODEL_KEYS = ("init", "fixed")
#: Name (without .ckpt) of the checkpoint rewritten every epoch in RUN/checkpoints/.
LAST_CHECKPOINT = "last"


def precision_dtype(precision: Any) -> torch.dtype:
    """Floating dtype of the data and model for a Lightning ``precision`` setting."""
    return torch.float64 if str(precision).startswith("64") else torch.float32


# --------------------------------------------------------------------------------------- data
def load_data(
    data_cfg: DictConfig | Mapping, dtype: torch.dtype, table: EventTable | None = None
) -> tuple[Population, Population | None]:
    """``(fit subjects, held-out subjects or None)`` from a data config (split keys included).

    ``table``: the config's table as :func:`~deepnlme.training.data_source.read_data` returned
    it (a CSV source is then built from it, not read again).
    """
    config = plain(data_cfg)
    fraction = float(config.get("heldout_fraction") or 0.0)
    with data_errors(config):
        pop = load_from_config(config, dtype=dtype, table=table)
        if fraction <= 0:
            return pop, None
        return split_heldout(pop, fraction, int(config.get("split_seed") or 0))


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
    from deepnlme.fitted import import_object
    from deepnlme.model.base import NLMEModel

    config = plain(model_cfg)
    target = config.get("_target_")
    if not target or target == "???":
        raise SetupError(
            "model config needs a _target_: set model._target_=module.Class (an NLMEModel "
            "subclass), e.g. model=custom model._target_=mymodels.MyModel"
        )
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
    from deepnlme.fitted import default_dtype

    config = model_arguments(model_cfg)
    try:
        with default_dtype(dtype):
            model = instantiate(config, _convert_="all")
    except (InstantiationException, KeyError, ValueError, TypeError) as exc:
        raise SetupError(f"model {config['_target_']}: {_message(exc)}") from exc
    return model, config


def check_data(model: NLMEModel, pop: Population) -> None:
    """Raise if ``pop`` lacks a covariate of ``model`` or uses a compartment it does not have."""
    from deepnlme.fitted import check_model_data

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
    from deepnlme.inference.optimize import OuterOptions

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
    """Keep Lightning's product tips, its internal deprecation notice and its note on resuming
    into another directory out of fit output."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisements) for f in logger.filters):
        logger.addFilter(_NoAdvertisements())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # resuming into a new run directory (ckpt_path=OLD_RUN/checkpoints/last.ckpt) is the usual case
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


#: How to get a CUDA build of the pinned PyTorch (README, section on GPUs).
CUDA_INSTALL = (
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/<CUDA tag, e.g. "
    "cu128> (the tag for your driver: https://pytorch.org/get-started/locally/)"
)


def check_accelerator(accelerator: Any) -> None:
    """Raise :class:`SetupError` when ``accelerator`` asks for a GPU that PyTorch cannot use:
    a CPU-only build (``torch.version.cuda`` is None), or no GPU visible to a CUDA build."""
    if str(accelerator).lower() not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        raise SetupError(
            f"trainer=gpu needs a CUDA build of PyTorch, and this one ({torch.__version__}) is "
            f"CPU-only; install one with: {CUDA_INSTALL}; or run on the CPU (trainer=default)"
        )
    raise SetupError(
        f"trainer=gpu: PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
        "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or run on the CPU "
        "(trainer=default)"
    )


def build_trainer(
    trainer_cfg: DictConfig | Mapping, output_dir: str | Path, callbacks: list
) -> pl.Trainer:
    """The Lightning Trainer of the config, writing under ``output_dir``.

    Adds to ``callbacks`` a checkpoint at ``output_dir/checkpoints/last.ckpt`` rewritten at the
    end of every epoch (Lightning writes it whole to a temporary file that is then moved into
    place, so a fit killed at any moment leaves the last complete epoch's state) and, when the
    progress bar is enabled, :class:`FitProgressBar`.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from deepnlme.training.callbacks import FitProgressBar

    quiet_lightning()
    config = plain(trainer_cfg)
    # One file named "last", kept and overwritten each epoch (no monitored metric: top-1 is the
    # newest). save_last=True with save_top_k=0 would write it only when the fit ends.
    check_accelerator(config.get("accelerator"))
    checkpoints = ModelCheckpoint(
        dirpath=Path(output_dir) / "checkpoints",
        filename=LAST_CHECKPOINT,
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
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


def diagnostic_options(cfg: DictConfig | Mapping) -> DiagnosticOptions:
    """The ``diagnostics`` options of a command's config, checked (a bad value: SetupError)."""
    from deepnlme.diagnostics.write import DiagnosticOptions  # plotting stack: import late

    try:
        return DiagnosticOptions.from_mapping(plain(cfg.get("diagnostics") or {}))
    except ValueError as exc:
        raise SetupError(str(exc)) from exc


def set_threads(cfg: DictConfig | Mapping) -> None:
    """Apply the config's ``threads`` (torch CPU threads; null keeps torch's default)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
