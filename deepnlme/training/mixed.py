"""The command-line path of formula mixed models (``model=mixed``): table -> design -> fit ->
results.json, conditional modes, held-out criticism, plots and checkpoint; and prediction
from such a checkpoint. The math is in :mod:`deepnlme.mixed`."""

from __future__ import annotations

import logging
import math
import signal
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig

from deepnlme.cli import Interrupted
from deepnlme.diagnostics.report import write_results
from deepnlme.inference.mcem import MCEMOptions
from deepnlme.mixed.design import MixedDesign, build_design
from deepnlme.mixed.fitted import CHECKPOINT_KEY, FittedMixed, heldout_metrics
from deepnlme.mixed.formula import FormulaError, parse_formula
from deepnlme.mixed.mcem_fit import fit_mcem
from deepnlme.mixed.plots import save_effect_histograms, save_residual_histogram
from deepnlme.mixed.problem import fit_problem
from deepnlme.mixed.result import MixedFit
from deepnlme.mixed.tables import load_table, split_rows
from deepnlme.training.build import SetupError, plain, set_threads

log = logging.getLogger("deepnlme.train")

FAMILIES = ("gaussian", "binomial", "poisson", "ordinal")


def is_formula_model(cfg: DictConfig | Mapping) -> bool:
    """Whether the run's model config is a formula model (it has a ``formula``)."""
    return bool(cfg.get("model") is not None and cfg["model"].get("formula"))


def method_name(method_cfg: Mapping[str, Any]) -> str:
    """``method.name``, else the NLME method config's estimator name (``laplace``)."""
    return str(method_cfg.get("name") or (method_cfg.get("estimator") or {}).get("name") or "")


def resolve_method(family: str, method: str) -> str:
    """``ml``/``reml`` for Gaussian fits, ``laplace`` for the others (``method=laplace``,
    ``focei`` or ``foce`` ask for the family's marginal likelihood); raises SetupError."""
    if family not in FAMILIES:
        raise SetupError(f"model.family must be one of {', '.join(FAMILIES)} (got {family!r})")
    if method in ("mcem", "vi"):
        return method
    # the NLME marginal-likelihood methods (focei is the main job's default) mean the family's
    # own marginal likelihood here: exact for Gaussian fits, Laplace for the others
    marginal = ("ml", "laplace", "focei", "foce")
    if family == "gaussian":
        if method in marginal:
            return "ml"
        if method == "reml":
            return "reml"
    elif method in marginal:
        return "laplace"
    raise SetupError(f"method={method} does not fit a {family} formula model; use "
                     + ("method=ml or method=reml" if family == "gaussian" else "method=laplace"))


def fit_design(cfg: DictConfig, design: MixedDesign, family: str, link: str | None,
               method: str, output_dir: Path) -> MixedFit:
    """The fit of ``design`` by ``ml``, ``reml`` or ``laplace`` (full-batch bounded L-BFGS
    through Lightning: :mod:`deepnlme.training.mixed_module`) or ``mcem``."""
    model = plain(cfg.model)
    if method == "mcem":
        keys = MCEMOptions.__dataclass_fields__
        method_cfg = {**plain(cfg.method), "seed": int(cfg.seed)}
        options = MCEMOptions(**{k: v for k, v in method_cfg.items() if k in keys})
        try:
            return fit_mcem(design, family, link, options)
        except ValueError as exc:
            raise SetupError(str(exc)) from exc
    from deepnlme.training.mixed_module import METADATA_KEY, fit_full_batch

    try:
        problem = fit_problem(design, family, link, method, bool(cfg.get("se", True)))
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    metadata = run_metadata(design, family, method)
    check_resumable(cfg.get("ckpt_path"), METADATA_KEY, metadata)
    opt, seconds, received = fit_full_batch(
        problem, plain(cfg.trainer), output_dir, int(model.get("max_iter") or 500),
        int(model.get("iterations_per_epoch") or 100), cfg.get("ckpt_path"), metadata,
    )
    if received is not None:
        last = output_dir / "checkpoints" / "last.ckpt"
        raise Interrupted(
            f"fit interrupted by {signal.Signals(received).name} after {opt.n_iter} "
            f"iterations; resume with ckpt_path={last}", received,
        )
    fit = problem.report(opt, seconds)
    fit.extra["optimizer_seconds"] = seconds
    return fit


def run_metadata(design: MixedDesign, family: str, method: str) -> dict[str, Any]:
    """What a training checkpoint of a formula model records about its run."""
    return {"model": "mixed", "formula": design.formula.text, "family": family,
            "method": method, "n_obs": design.n_obs}


def check_resumable(ckpt_path: str | None, key: str, metadata: Mapping[str, Any]) -> None:
    """Raise :class:`SetupError` unless ``ckpt_path`` (if given) is a training checkpoint of a
    run with the same formula, family, method and rows."""
    if not ckpt_path:
        return
    try:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True).get(key)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line for the user
        raise SetupError(f"cannot resume from ckpt_path {ckpt_path}: {exc}") from None
    if saved != dict(metadata):
        raise SetupError(
            f"cannot resume from ckpt_path {ckpt_path}: it was written by another run "
            f"({saved or 'not a formula-model fit'}); resume with the same overrides as the run"
        )


def load_design(cfg: DictConfig) -> tuple[MixedDesign, pd.DataFrame | None, str]:
    """``(design of the fit rows, held-out rows or None, source)`` of the run's config."""
    data, model = plain(cfg.data), plain(cfg.model)
    try:
        table, source = load_table(data)
        formula = parse_formula(model["formula"])
        fit_rows, held = split_rows(
            table, float(data.get("heldout_fraction") or 0.0), int(data.get("split_seed") or 0)
        )
    except (FormulaError, ValueError) as exc:
        raise SetupError(f"model=mixed: {exc}") from exc
    if model.get("family") == "ordinal":
        check_ordinal(fit_rows, formula.response, source)
    design = build_design(fit_rows, formula, source, factors=data.get("factors") or ())
    return design, held, source


def check_ordinal(table: pd.DataFrame, response: str, source: str) -> None:
    """Ordinal responses must be integer ratings."""
    from deepnlme.data.errors import DataValidationError

    if response not in table.columns:
        return
    col = pd.to_numeric(table[response], errors="coerce")
    bad = col.isna() | (col != col.round())
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise DataValidationError(
            f"{source}: row {row + 1}, column {response}: an ordinal response must be an "
            f"integer rating (got {table[response].iloc[row]!r})"
        )


def device_of(cfg: DictConfig) -> str:
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SetupError("trainer=gpu: no CUDA device is available")
        return "cuda"
    return "cpu"


def modes_table(fit: MixedFit) -> pd.DataFrame:
    """One row per level and random-effect column: mode and conditional SD."""
    frames = []
    for m in fit.modes:
        for j, name in enumerate(m.names):
            frames.append(pd.DataFrame({
                "group": m.group, "level": m.levels, "name": name,
                "mode": m.mode[:, j], "cond_sd": m.sd[:, j],
            }))
    return pd.concat(frames, ignore_index=True)


def fit_vi(cfg: DictConfig, design: MixedDesign, family: str, link: str | None,
           output_dir: Path) -> MixedFit | None:
    """``method=vi`` through Lightning (:func:`~deepnlme.training.stochastic.fit_stochastic`:
    minibatches of ``data.batch_rows`` rows, Adam with a cosine schedule, checkpoints that
    resume, ``trainer.devices``/``strategy`` for data-parallel fits). None on the
    non-reporting ranks of a data-parallel fit."""
    from deepnlme.fitted import CHECKPOINT_KEY as RUN_KEY
    from deepnlme.inference.pyro.vi import NonFiniteObjective
    from deepnlme.mixed import families
    from deepnlme.mixed.vi import FormulaVI
    from deepnlme.training.build import check_accelerator, precision_dtype
    from deepnlme.training.stochastic import fit_stochastic

    method, trainer_cfg = plain(cfg.method), plain(cfg.trainer)
    options = method.get("mixed") or {}
    check_accelerator(trainer_cfg.get("accelerator"))
    link = "identity" if family == "gaussian" else families.check_family(family, link)
    dtype = precision_dtype(trainer_cfg.get("precision", "64-true"))
    estimator = FormulaVI(design, family, link, int(method.get("num_particles") or 1),
                          float(options.get("init_scale", 0.1)), int(cfg.seed), dtype,
                          int(options.get("rank", 0)))
    n = len(estimator.table)
    batch_rows = min(int(cfg.data.get("batch_rows") or n), n)
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and batch_rows % devices:
        raise SetupError(f"data.batch_rows={batch_rows} is not divisible by the {devices} "
                         "devices")
    steps = int(options.get("steps", 3000))
    run = {"epochs": max(1, math.ceil(steps / math.ceil(n / batch_rows))),
           "lr": float(options.get("lr", 0.05)), "lr_final": float(options.get("lr_final", 0.02)),
           "checkpoint_every": int(options.get("checkpoint_every", 500))}
    metadata = run_metadata(design, family, "vi")
    check_resumable(cfg.get("ckpt_path"), RUN_KEY, metadata)
    try:
        trainer, summary = fit_stochastic(run, trainer_cfg, estimator, estimator.table,
                                          batch_rows, int(cfg.seed), dtype, output_dir, metadata,
                                          cfg.get("ckpt_path"))
    except (NonFiniteObjective, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    if trainer.global_rank != 0:
        return None
    estimator.model.cpu(), estimator.guide.cpu()
    fit = estimator.result(
        se=bool(cfg.get("se", True)), converged=summary["converged"],
        n_iter=summary["n_iter"], n_eval=summary["n_iter"],
        message=f"VI: {summary['n_iter']} steps of {batch_rows} rows ({summary['stop_reason']})",
    )
    fit.extra.update(elbo=estimator.elbo_value(), batch_rows=batch_rows,
                     optimizer_seconds=summary["fit_seconds"])
    return fit


def train_mixed(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Fit the formula model of ``cfg`` and write the run's outputs into ``output_dir``."""
    set_threads(cfg)
    torch.manual_seed(int(cfg.seed))
    model = plain(cfg.model)
    family = str(model.get("family") or "gaussian")
    method = resolve_method(family, method_name(plain(cfg.method)))
    start = time.perf_counter()
    design, held, source = load_design(cfg)
    if method == "vi":  # the design stays on the CPU: Lightning moves each batch
        fit = fit_vi(cfg, design, family, model.get("link"), output_dir)
        if fit is None:
            return {}
    else:
        design.to(device_of(cfg))
        fit = fit_design(cfg, design, family, model.get("link"), method, output_dir)
    run_seconds = time.perf_counter() - start
    fitted = FittedMixed.from_fit(fit, design, {"model": model, "data": plain(cfg.data)})
    summary = fit.summary()
    # fit_seconds is the fit alone (the optimizer's or the sampler's wall time); run_seconds
    # adds reading the data, building the design and starting the trainer
    fit_seconds = float(summary.pop("fit_seconds", None)
                        or summary.get("optimizer_seconds") or run_seconds)
    results: dict[str, Any] = {
        "model": "mixed", "method": method, "data": str(cfg.data.name),
        "formula": design.formula.text, "n_groups": {t.group: t.n_levels for t in design.terms},
        **summary, "ofv": fit.deviance, "fit_seconds": fit_seconds,
        "run_seconds": run_seconds,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    modes_table(fit).to_csv(output_dir / "ranef.csv", index=False)
    pd.DataFrame(fit.coefficients()).to_csv(output_dir / "coefficients.csv", index=False)
    save_effect_histograms(fit.modes, output_dir / "ranef_hist.png")
    if held is not None:
        predictions = fitted.predict(held, f"{source} (held-out rows)")
        if "y" in predictions:
            unseen = _unseen_rows(fitted, held, source)
            results["heldout"] = heldout_metrics(predictions, unseen)
            save_residual_histogram(
                predictions["residual"].to_numpy(), output_dir / "heldout_residuals.png",
                f"held-out residuals (RMSE {results['heldout']['rmse']:.4f})",
            )
        predictions.to_csv(output_dir / "heldout_predictions.csv", index=False)
    fitted.save(output_dir / "checkpoints" / "last.ckpt", into_existing=method != "mcem")
    write_results(output_dir / "results.json", results)
    log.info("loglik %.4f  converged %s (%d iterations, %.1f s)  -> %s", fit.loglik,
             fit.converged, fit.n_iter, fit_seconds, output_dir)
    return results


def _unseen_rows(fitted: FittedMixed, table: pd.DataFrame, source: str) -> int:
    from deepnlme.mixed.design import group_labels

    unseen = torch.zeros(len(table), dtype=torch.bool)
    for t in fitted._terms():
        known = set(t.levels)
        labels = group_labels(table, t.group_columns)
        unseen |= torch.as_tensor([s not in known for s in labels])
    return int(unseen.sum())


def is_mixed_checkpoint(path: str) -> bool:
    """Whether ``path`` is a formula-model checkpoint."""
    if not zipfile.is_zipfile(path):  # not a checkpoint at all: the NLME loader says why
        return False
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable files are reported by the NLME loader
        return False
    return isinstance(data, dict) and CHECKPOINT_KEY in data


def predict_mixed(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """``predict.py`` for a formula-model checkpoint: predictions for the rows of ``data``
    (the checkpoint's training table when no ``data=`` is given)."""
    set_threads(cfg)
    try:
        fitted = FittedMixed.load(str(cfg.ckpt_path))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SetupError(f"cannot load checkpoint {cfg.ckpt_path}: {exc}") from exc
    data = plain(cfg.data) if cfg.get("data") is not None else dict(fitted.config["data"])
    try:
        table, source = load_table(data)
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    predictions = fitted.predict(table, source)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(output_dir / "predictions.csv", index=False)
    results: dict[str, Any] = {
        "model": "mixed", "data": str(data.get("name")), "ckpt_path": str(cfg.ckpt_path),
        "formula": fitted.formula_text, "n_obs": len(table),
    }
    if "y" in predictions:
        results["metrics"] = heldout_metrics(predictions, _unseen_rows(fitted, table, source))
    write_results(output_dir / "results.json", results)
    log.info("predicted %d rows -> %s", len(table), output_dir)
    return results
