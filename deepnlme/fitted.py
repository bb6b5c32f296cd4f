"""A fitted model: load a checkpoint safely, predict new subjects, simulate.

Checkpoint format (written by :class:`deepnlme.training.module.NLMEFitModule`): a Lightning
checkpoint whose ``state_dict`` holds the model's weights under ``model.`` and whose
``"deepnlme"`` entry (:func:`checkpoint_metadata`) holds only plain data: the resolved run
config as a dict, the data schema (covariate names), the method name and the float dtype.
Loading (:func:`read_checkpoint`) accepts only zip-format torch files read with
``torch.load(..., weights_only=True)``: nothing in the file is executed. The model class is
imported by the dotted name in the config's ``model._target_`` and called with the config's
arguments (no pickle, no Hydra), but only from a trusted module: ``deepnlme`` or one the user
names (``trusted_modules``), because importing a module runs its top-level code. Weights that
are not finite are refused.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from deepnlme.data.build import check_compartments
from deepnlme.data.population import Population
from deepnlme.diagnostics.evaluation import Evaluation, evaluate
from deepnlme.diagnostics.simulation import simulate
from deepnlme.model.base import NLMEModel

CHECKPOINT_KEY = "deepnlme"
STATE_PREFIX = "model."
FORMAT_VERSION = 1
#: What a FittedModel uses of its estimator.
ESTIMATOR_METHODS = ("subject_loglik", "modes", "reset")
#: Packages whose classes a checkpoint may name without being trusted on the command line.
TRUSTED_PACKAGES = ("deepnlme",)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a deepnlme checkpoint file, read safely (nothing in it is executed).

    Only zip-format torch files (what Lightning writes) are read, with
    ``torch.load(..., weights_only=True)``: plain pickles, legacy (non-zip) torch files and files
    holding anything but tensors and plain data are refused.

    Raises:
        ValueError: a missing, empty or unreadable file, or one without a deepnlme entry or in
            a newer format (the message is one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a deepnlme checkpoint (not a zip-format torch file; plain pickles and "
            "legacy torch files are not read)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        blocked = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
        reason = blocked[0].strip() if blocked else "objects other than tensors and plain data"
        raise ValueError(f"{path}: refused, not plain data ({reason})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: unreadable torch file ({first})") from None
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path}: not a deepnlme checkpoint (no {CHECKPOINT_KEY!r} entry)")
    if int(meta.get("format", FORMAT_VERSION)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {meta['format']} is newer than this deepnlme reads "
            f"({FORMAT_VERSION}); update deepnlme"
        )
    return checkpoint


def check_trusted(path: str, trusted_modules: Sequence[str] = ()) -> None:
    """Raise unless the dotted path ``path`` lies in ``deepnlme`` or in ``trusted_modules``.

    A checkpoint names classes by dotted path; importing their module runs its top-level code,
    so only modules the user trusts (names on the command line) are imported.

    Raises:
        ValueError: the module is not trusted (the message says how to trust it).
    """
    module = str(path).rpartition(".")[0]
    trusted = (*TRUSTED_PACKAGES, *(str(m) for m in trusted_modules))
    if not any(module == m or module.startswith(f"{m}.") for m in trusted):
        top = module.split(".")[0] or str(path)
        raise ValueError(
            f"the checkpoint names {path!r}; loading would import module {top!r}, which is not "
            f"trusted: if you trust it, add trusted_modules=[{top}]"
        )


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise ValueError naming the parameters/buffers of ``model`` that hold NaN or inf."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    bad = [
        name for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"weights are not finite (NaN or inf): {shown}")


def checkpoint_metadata(
    config: Mapping[str, Any],
    covariate_names: list[str],
    dtype: torch.dtype,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Plain-data entry saved with the weights (what :meth:`FittedModel.load` needs).

    Args:
        config: the resolved run config (``model``, ``method`` and ``data`` entries).
        covariate_names: the training data's covariates (the data schema).
        dtype: floating dtype of the fit.
        names: how the run names its model, method and data (for reports).
    """
    return {
        "format": FORMAT_VERSION,
        "config": _plain(config),
        "covariate_names": [str(c) for c in covariate_names],
        "dtype": str(dtype).removeprefix("torch."),
        "names": _plain(names or {}),
    }


def import_object(path: str) -> Any:
    """The object named by a dotted path, ``"package.module.Name"`` (module imported)."""
    module_name, _, attr = str(path).rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path 'module.Name'")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_object(
    config: Mapping[str, Any],
    base: type = object,
    methods: Sequence[str] = (),
    trusted_modules: Sequence[str] = (),
    **kwargs: Any,
) -> Any:
    """Call the class ``config["_target_"]`` with the other keys (nested targets first) + kwargs.

    Only classes are called: a subclass of ``base`` that has the attributes ``methods`` (so a
    checkpoint cannot name an arbitrary function); nested targets must be ``nn.Module`` classes.
    Every target must lie in ``deepnlme`` or ``trusted_modules`` (:func:`check_trusted`).
    Keys starting with ``_`` other than ``_target_`` (Hydra's ``_convert_`` etc.) are ignored.

    Raises:
        ValueError: the target is not such a class, or not in a trusted module.
    """
    path = str(config["_target_"])
    check_trusted(path, trusted_modules)
    cls = import_object(path)
    if not (isinstance(cls, type) and issubclass(cls, base)) or not all(
        hasattr(cls, m) for m in methods
    ):
        raise ValueError(f"{path!r} is not a {base.__name__} class with {list(methods)}")
    args = {
        k: _build_nested(v, trusted_modules)
        for k, v in config.items()
        if not str(k).startswith("_")
    }
    return cls(**args, **kwargs)


def _build_nested(value: Any, trusted_modules: Sequence[str]) -> Any:
    if isinstance(value, Mapping):
        if "_target_" in value:
            return build_object(value, base=torch.nn.Module, trusted_modules=trusted_modules)
        return {k: _build_nested(v, trusted_modules) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_build_nested(v, trusted_modules) for v in value]
    return value


def _plain(value: Any) -> Any:
    """Nested mappings/sequences -> dicts/lists of str, int, float, bool, None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def check_model_data(model: NLMEModel, pop: Population) -> None:
    """Raise if ``pop`` lacks a covariate of ``model`` (ValueError) or has a CMT beyond the
    model's compartments (:class:`~deepnlme.data.errors.DataValidationError`)."""
    model.check_population(pop)
    dynamics = getattr(model, "dynamics", None)
    if dynamics is not None:
        check_compartments(pop, len(dynamics.compartments))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype (parameters are created in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class FittedModel:
    """A model with fitted parameters and the estimator it was fitted with."""

    model: NLMEModel
    estimator: Any  # e.g. LaplaceEstimator (subject_loglik, modes)
    config: dict[str, Any]  # the resolved run config (plain dict)
    covariate_names: list[str]  # covariates of the training data, in order
    dtype: torch.dtype
    names: dict[str, str] = field(default_factory=dict)  # model/method/data names of the run

    @classmethod
    def load(
        cls,
        path: str | Path,
        map_location: str | torch.device = "cpu",
        trusted_modules: Sequence[str] = (),
    ) -> FittedModel:
        """Rebuild the model from a checkpoint's config and load its weights (safely).

        Args:
            path: a checkpoint written by a fit (:func:`read_checkpoint`).
            map_location: device of the loaded model.
            trusted_modules: modules besides ``deepnlme`` whose classes the checkpoint may
                name (the user's model modules); no other module is imported.

        Raises:
            ValueError: the file is not a deepnlme checkpoint, names a class outside the
                trusted modules, or holds weights that are not finite.
        """
        checkpoint = read_checkpoint(path, map_location)
        try:
            return cls._from_checkpoint(checkpoint, map_location, trusted_modules)
        except (ValueError, TypeError, KeyError, ImportError, AttributeError, RuntimeError) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ValueError(f"{path}: {' '.join(str(text).split())}") from exc

    @classmethod
    def _from_checkpoint(
        cls,
        checkpoint: Mapping[str, Any],
        map_location: str | torch.device,
        trusted_modules: Sequence[str],
    ) -> FittedModel:
        meta = checkpoint[CHECKPOINT_KEY]
        config = meta["config"]
        dtype = getattr(torch, str(meta.get("dtype", "float64")), None)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"unknown dtype {meta.get('dtype')!r}")
        with default_dtype(dtype):
            model = build_object(config["model"], base=NLMEModel, trusted_modules=trusted_modules)
        state = {
            k.removeprefix(STATE_PREFIX): v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(STATE_PREFIX)
        }
        model.load_state_dict(state)
        check_finite_weights(model)
        model.to(device=map_location, dtype=dtype)
        estimator = build_object(
            config["method"]["estimator"],
            methods=ESTIMATOR_METHODS,
            trusted_modules=trusted_modules,
            model=model,
        )
        restore = getattr(estimator, "load_checkpoint_state", None)
        if restore is not None:  # estimators with state of their own (e.g. a guide)
            restore(checkpoint["state_dict"])
        names = dict(meta.get("names", {}))
        return cls(model, estimator, config, list(meta["covariate_names"]), dtype, names)

    def _prepare(self, pop: Population) -> Population:
        check_model_data(self.model, pop)
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        return pop.to(device, dtype=self.dtype)

    def evaluate(self, pop: Population, split: str = "new") -> Evaluation:
        """η̂, log-likelihood and predictions of ``pop`` at the fitted parameters."""
        self.estimator.reset()
        return evaluate(self.model, self.estimator, self._prepare(pop), split)

    def predict(self, pop: Population) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(ebes, predictions)`` tables of ``pop``'s subjects, η̂ from their own data.

        ``ebes``: ID, split, loglik, ``eta_<name>``, individual parameters (one row per
        subject); ``predictions``: ID, TIME, DV, PRED, IPRED, IWRES, CMT, split.
        """
        evaluation = self.evaluate(pop)
        return evaluation.ebes, evaluation.prediction_table()

    def loglik(self, pop: Population) -> float:
        """Marginal log-likelihood of ``pop`` at the fitted parameters."""
        return self.evaluate(pop).loglik

    def simulate(self, pop: Population, seed: int = 0) -> pd.DataFrame:
        """One replicate of ``pop``'s design: η ~ N(0, Ω), DV from the residual model.

        Reproducible for a given ``seed`` (torch's global random state is left untouched).
        Columns: ID, TIME, DV, IPRED, CMT, ``eta_<name>``.
        """
        pop = self._prepare(pop)
        devices = [pop.device] if pop.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return simulate(self.model, pop)
