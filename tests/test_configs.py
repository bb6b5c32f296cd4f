"""Every combination of the config groups composes; each config builds what it documents."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deepnlme.inference.laplace import LaplaceEstimator
from deepnlme.model.base import NLMEModel
from deepnlme.training import build

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "model", "method", "trainer")
DATA_KEYS = {"name", "path", "covariates", "heldout_fraction", "split_seed"}
METHOD_KEYS = {"estimator", "lr", "max_iter", "gtol", "converged_gtol", "iterations_per_epoch"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


COMBINATIONS = list(itertools.product(*(options(g) for g in GROUPS)))


@pytest.fixture(scope="module")
def hydra_configs():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def compose_train(*overrides: str, hydra: bool = False):
    # Pin a quick classical model and data unless the test names its own.
    pinned = [f"{g}={v}" for g, v in (("model", "one_cmt_oral"), ("data", "theophylline"))]
    given = {o.split("=")[0] for o in overrides}
    defaults = [p for p in pinned if p.split("=")[0] not in given]
    return compose("train", [*defaults, *overrides], return_hydra_config=hydra)


def test_train_defaults_list():
    defaults = OmegaConf.load(CONFIGS / "train.yaml").defaults
    choices = {k: v for d in defaults if not isinstance(d, str) for k, v in d.items()}
    assert choices == {
        "data": "synthetic_pk",
        "model": "neural_pk",
        "method": "focei",
        "trainer": "default",
        "hydra": "default",
    }


@pytest.mark.parametrize(("data", "model", "method", "trainer"), COMBINATIONS)
def test_every_combination_composes(hydra_configs, data, model, method, trainer):
    cfg = compose_train(f"data={data}", f"model={model}", f"method={method}", f"trainer={trainer}")
    assert DATA_KEYS <= set(cfg.data)
    assert cfg.model._target_ and "init" in cfg.model and "fixed" in cfg.model
    assert METHOD_KEYS <= set(cfg.method)
    assert cfg.method.estimator._target_ == "deepnlme.inference.laplace.LaplaceEstimator"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.seed is not None and cfg.ckpt_path is None
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_main_job_is_the_default(hydra_configs):
    cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.runtime.choices.model == "neural_pk"
    assert cfg.hydra.runtime.choices.data == "synthetic_pk"
    assert cfg.hydra.runtime.choices.method == "focei"


def test_run_dir_default_and_override(hydra_configs):
    assert compose_train(hydra=True).hydra.run.dir.startswith("outputs/")
    assert compose_train("hydra.run.dir=/tmp/x", hydra=True).hydra.run.dir == "/tmp/x"


@pytest.mark.parametrize(
    ("method", "hessian", "interaction"),
    [("laplace", "exact", True), ("focei", "expected", True), ("foce", "expected", False)],
)
def test_method_configs_build_their_estimator(hydra_configs, method, hessian, interaction):
    cfg = compose_train(f"method={method}")
    model, _ = build.build_model(cfg.model, torch.float64)
    estimator = build.build_estimator(cfg.method, model)
    assert isinstance(estimator, LaplaceEstimator)
    assert (estimator.name, estimator.hessian, estimator.interaction) == (
        method, hessian, interaction
    )
    options, per_epoch = build.outer_options(cfg.method)
    assert options.max_iter >= per_epoch >= 1
    assert options.gtol < options.converged_gtol


@pytest.mark.parametrize("model", options("model"))
def test_model_configs_build_float64_models(hydra_configs, model):
    cfg = compose_train(f"model={model}")
    built, arguments = build.build_model(cfg.model, torch.float64)
    assert isinstance(built, NLMEModel)
    assert arguments["_target_"] == cfg.model._target_
    assert all(p.dtype == torch.float64 for p in built.parameters())


@pytest.mark.parametrize(
    ("data", "covariates"),
    [("theophylline", ["WT"]), ("phenobarbital", ["WT", "APGAR"]), ("csv", [])],
)
def test_data_config_covariates(hydra_configs, data, covariates):
    cfg = compose_train(f"data={data}")
    assert list(cfg.data.covariates) == covariates
    assert cfg.data.heldout_fraction == 0.0


@pytest.mark.parametrize("data", [d for d in options("data") if d != "csv"])
def test_data_configs_load(hydra_configs, data):
    cfg = compose_train(f"data={data}")
    pop, heldout = build.load_data(cfg.data, torch.float64)
    assert (heldout is None) == (cfg.data.heldout_fraction == 0) and len(pop) > 0
    assert pop.obs_dv.dtype == torch.float64
    assert pop.covariate_names == list(cfg.data.covariates) or not cfg.data.covariates


def test_heldout_split_from_config(hydra_configs):
    cfg = compose_train("data=phenobarbital", "data.heldout_fraction=0.25", "data.split_seed=1")
    fit, heldout = build.load_data(cfg.data, torch.float64)
    assert (len(fit), len(heldout)) == (44, 15)
    assert not set(fit.ids) & set(heldout.ids)


def test_csv_without_path_is_a_setup_error(hydra_configs):
    with pytest.raises(build.SetupError, match="data.path"):
        build.load_data(compose_train("data=csv").data, torch.float64)


def test_init_override_from_the_command_line_reaches_the_model(hydra_configs):
    args = ["model=one_cmt_oral", "model.init.tvv=200", "model.fixed=[tvv]"]
    cfg = compose_train(*build.open_init_overrides(args))
    model, _ = build.build_model(cfg.model, torch.float64)
    assert float(model.tvv.value().detach()) == pytest.approx(200.0)
    assert model.tvv.fixed and not model.tvcl.fixed
    unknown = compose_train(*build.open_init_overrides(["model.init.foo=1"]))
    with pytest.raises(build.SetupError, match="no parameter 'foo'"):
        build.build_model(unknown.model, torch.float64)


def test_class_specific_keys_are_dropped_for_another_target(hydra_configs):
    cfg = compose_train("model=one_cmt_iv", "model._target_=deepnlme.model.zoo.pk.PhenoModel")
    model, arguments = build.build_model(cfg.model, torch.float64)
    assert type(model).__name__ == "PhenoModel"
    assert set(arguments) == {"_target_", "init", "fixed"}


def test_predict_config_composes(hydra_configs):
    cfg = compose("predict", ["ckpt_path=x.ckpt"])
    assert cfg.get("data") is None and cfg.ckpt_path == "x.ckpt"
    assert compose("predict", ["ckpt_path=x", "data=csv", "data.path=a.csv"]).data.path == "a.csv"
