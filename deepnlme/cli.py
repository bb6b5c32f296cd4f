"""The command-line edge shared by ``train.py``, ``predict.py`` and ``simulate.py``.

Light on purpose: importing this module imports neither torch nor Lightning, so that
``--help``, argument errors and data errors answer before the heavy libraries load (the
commands import them inside their steps). Problems a user can fix are raised as
:class:`SetupError` or :class:`~deepnlme.data.errors.DataValidationError`, whose message is one
line; :func:`exit_on_user_error` turns them into that line on stderr and exit status 1. A fit
stopped by SIGINT/SIGTERM raises :class:`Interrupted` (exit status 128 + the signal number).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig


class SetupError(Exception):
    """A run cannot start: bad configuration, or model and data do not fit together."""


class Interrupted(Exception):
    """A fit stopped by a signal after saving its state; ``exit_status`` is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + int(signum)


def one_line(exc: BaseException) -> str:
    """One line describing ``exc`` (the cause of Hydra's wrapper exceptions)."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


#: User-error classes of the heavy layers, as (module, class name): their modules import torch,
#: so they are looked up only in modules already loaded (an exception of a class implies that
#: its module is loaded). Their messages are one line, like :class:`SetupError`'s.
USER_ERRORS = (
    ("deepnlme.data.errors", "DataValidationError"),
    ("deepnlme.inference.feasibility", "ObjectiveError"),
)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a problem the user can fix (reported as one line, exit status 1)."""
    if isinstance(exc, SetupError):
        return True
    for module_name, class_name in USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Print user errors as one line on stderr and exit with status 1 (no traceback); a fit
    stopped by a signal exits with 128 + the signal number after its one line."""
    try:
        yield
    except Interrupted as exc:
        print(f"stopped: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(exc.exit_status) from None
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def open_init_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with ``model.init.NAME=V`` turned into ``++model.init.NAME=V``.

    ``model.init`` is an open dict of initial estimates (``{}`` in the configs); Hydra would
    otherwise ask for ``+`` to add a key to it.
    """
    return [f"++{a}" if a.startswith("model.init.") else a for a in args]


def objective(results: Mapping[str, Any], metric: str | None) -> float | None:
    """The value a sweeper optimizes: ``results[metric]``, dotted for nested entries
    (``"ofv"``, ``"heldout.loglik"``); None when ``metric`` is empty or there are no results
    (the ranks of a data-parallel fit other than the one that reports).

    A non-finite value is returned as NaN (Optuna records the trial as failed).

    Raises:
        SetupError: ``results`` has no such (numeric) entry.
    """
    if not metric or not results:
        return None
    value: Any = results
    for key in str(metric).split("."):
        if not isinstance(value, Mapping) or key not in value:
            available = sorted(k for k, v in results.items() if isinstance(v, (int, float, dict)))
            raise SetupError(
                f"optimized_metric {metric!r} is not in results.json (e.g. ofv, loglik, aic, "
                f"bic, heldout.loglik; top-level entries: {available})"
            )
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) and value is not None:
        raise SetupError(f"optimized_metric {metric!r} is not a number ({value!r})")
    value = math.nan if value is None else float(value)
    return value if math.isfinite(value) else math.nan


def run_command(step: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> Any:
    """Body of the command-line shims: ``step(cfg, run_dir)`` with the working directory
    importable (users' model modules: ``model._target_=mymodule.MyModel``) and user errors
    reported as one line without a traceback; returns what ``step`` returns."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    with exit_on_user_error():
        return step(cfg, Path(HydraConfig.get().runtime.output_dir))
