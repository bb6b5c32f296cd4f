"""Every combination of the config groups composes; each config builds what it documents."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from deepnlme.inference.laplace import LaplaceEstimator
from deepnlme.model.base import NLMEModel
from deepnlme.training import build

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "model", "method", "trainer")
DATA_KEYS = {"name", "path", "covariates", "heldout_fraction", "split_seed"}
METHOD_KEYS = {"estimator", "lr", "max_iter", "gtol", "converged_gtol", "iterations_per_epoch"}
#: Methods fitted by full-batch L-BFGS (the others are in deepnlme.inference.pyro).
LBFGS_METHODS = {"laplace", "focei", "foce"}


#: Config options of formula mixed models (model=mixed; tests/mixed/test_mixed_cli.py).
FORMULA_OPTIONS = {
    "data": {"insteval", "table"},
    "model": {"mixed"},
    "method": {"ml", "reml"},
}


def options(group: str) -> list[str]:
    """The group's options for NLME models; for ``model``, those with a class (not ``custom``)."""
    names = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if p.stem != "custom")
    return [n for n in names if n not in FORMULA_OPTIONS.get(group, ())]


COMBINATIONS = list(itertools.product(*(options(g) for g in GROUPS)))
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


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
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml").defaults)
    choices = {k: v for d in defaults if not isinstance(d, str) for k, v in d.items()}
    assert choices == {
        "data": "synthetic_pk",
        "model": "neural_pk",
        "method": "focei",
        "optional model_method": "${model}_${method}",
        "trainer": "default",
        "diagnostics": "default",
        "hydra": "default",
        "hparams_search": None,
    }


def test_diagnostics_options_compose_and_bad_ones_are_setup_errors(hydra_configs):
    options = build.diagnostic_options(compose_train("diagnostics.covariance=sandwich"))
    assert (options.covariance, options.n_sim, options.vpc_x) == ("sandwich", 200, "TAD")
    assert build.diagnostic_options(compose("predict", ["ckpt_path=x"])).plots is True
    with pytest.raises(build.SetupError, match="diagnostics.covariance must be one of"):
        build.diagnostic_options(compose_train("diagnostics.covariance=S"))


@pytest.mark.parametrize(("data", "model", "method", "trainer"), COMBINATIONS)
def test_every_combination_composes(hydra_configs, data, model, method, trainer):
    cfg = compose_train(f"data={data}", f"model={model}", f"method={method}", f"trainer={trainer}")
    assert DATA_KEYS <= set(cfg.data)
    assert cfg.model._target_ and "init" in cfg.model and "fixed" in cfg.model
    if method in LBFGS_METHODS:
        assert METHOD_KEYS <= set(cfg.method)
        assert cfg.method.estimator._target_ == "deepnlme.inference.laplace.LaplaceEstimator"
    else:
        assert cfg.method.estimator._target_.startswith("deepnlme.inference.pyro.")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.seed is not None and cfg.ckpt_path is None
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_main_job_is_the_default(hydra_configs):
    cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.runtime.choices.model == "neural_pk"
    assert cfg.hydra.runtime.choices.data == "synthetic_pk"
    assert cfg.hydra.runtime.choices.method == "focei"
    # the main job's own L-BFGS stop (configs/model_method/neural_pk_focei.yaml), below the
    # convergence criterion; other model/method pairs keep the method's
    assert cfg.method.gtol == 5e-4 < cfg.method.converged_gtol
    assert compose_train("method=focei").method.gtol == 1e-6
    # and its inner search (derivatives from differences of exact gradients, Newton steps)
    assert cfg.method.estimator.inner.value_differences == 0
    assert cfg.method.estimator.inner.chord_iter == 0
    assert "value_differences" not in compose_train("method=focei").method.estimator.inner


def test_main_job_with_vi_has_its_own_settings(hydra_configs):
    # configs/model_method/neural_pk_vi.yaml: gradient norm clipped by the Lightning trainer,
    # 4 draws per step, a lower learning rate; other models keep method=vi's defaults
    cfg = compose("train", ["method=vi"])
    default = compose_train("method=vi")
    assert (cfg.method.lr, cfg.method.num_particles) == (0.01, 4)
    assert cfg.method.estimator.num_particles == 4  # interpolated into the estimator
    assert cfg.method.epochs < default.method.epochs
    assert (default.method.lr, default.method.num_particles) == (0.02, 1)
    assert "gradient_clip_val" not in default.trainer
    trainer = instantiate(
        {**build.plain(cfg.trainer), "enable_progress_bar": False}, default_root_dir="/tmp"
    )
    assert trainer.gradient_clip_val == 100.0
    assert trainer.gradient_clip_algorithm == "norm"
    model, _ = build.build_model(cfg.model, torch.float64)
    estimator = build.build_estimator(cfg.method, model)
    assert (estimator.guide_kind, estimator.num_particles) == ("subject", 4)


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


@pytest.mark.parametrize("method", sorted(set(options("method")) - LBFGS_METHODS))
def test_pyro_method_configs_build_their_estimator(hydra_configs, method):
    cfg = compose_train(f"method={method}")
    model, _ = build.build_model(cfg.model, torch.float64)
    estimator = build.build_estimator(cfg.method, model)
    assert estimator.name == method and estimator.model is model
    assert estimator.fit_style in ("stochastic", "saem", "nuts", "mcem")


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


def test_custom_model_group_takes_any_class_without_warnings(hydra_configs, caplog):
    cfg = compose_train("model=custom", "model._target_=deepnlme.model.zoo.pk.PhenoModel")
    with caplog.at_level("WARNING"):
        model, arguments = build.build_model(cfg.model, torch.float64)
    assert type(model).__name__ == "PhenoModel"
    assert arguments == {"_target_": "deepnlme.model.zoo.pk.PhenoModel", "init": {}, "fixed": []}
    assert caplog.records == []
    # the class-specific keys of another group are what the warning was about
    other = compose_train("model=one_cmt_iv", "model._target_=deepnlme.model.zoo.pk.PhenoModel")
    with caplog.at_level("WARNING"):
        build.build_model(other.model, torch.float64)
    assert "takes no argument(s) ['error', 'omega_structure']; ignored" in caplog.text


def test_custom_model_group_without_a_class_is_a_setup_error(hydra_configs):
    with pytest.raises(build.SetupError, match=r"set model._target_=module.Class"):
        build.build_model(compose_train("model=custom").model, torch.float64)


@pytest.mark.parametrize(
    ("launcher", "partition", "gpus", "cpus"),
    [("slurm_cpu", None, None, 2), ("slurm_gpu", "gpu", 1, 4)],
)
def test_slurm_launcher_configs_compose(hydra_configs, launcher, partition, gpus, cpus):
    cfg = compose_train(f"hydra/launcher={launcher}", hydra=True).hydra.launcher
    assert cfg._target_ == SLURM_LAUNCHER
    assert (cfg.partition, cfg.gpus_per_task, cfg.cpus_per_task) == (partition, gpus, cpus)
    assert cfg.timeout_min > 0 and cfg.mem_gb > 0
    overrides = [
        f"hydra/launcher={launcher}", "hydra.launcher.partition=short",
        "hydra.launcher.gpus_per_task=2", "hydra.launcher.timeout_min=30",
        "hydra.launcher.mem_gb=64", "+hydra.launcher.additional_parameters.account=pk",
    ]
    cfg = compose_train(*overrides, hydra=True).hydra.launcher
    assert (cfg.partition, cfg.gpus_per_task, cfg.timeout_min, cfg.mem_gb) == ("short", 2, 30, 64)
    assert cfg.additional_parameters == {"account": "pk"}
    resolved = OmegaConf.to_container(cfg, resolve=False)
    assert resolved["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


def test_optuna_search_config_composes(hydra_configs):
    cfg = compose("train", ["hparams_search=neural_pk_optuna"], return_hydra_config=True)
    assert cfg.optimized_metric == "heldout.loglik" and cfg.data.heldout_fraction == 0.25
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize"
    assert dict(sweeper.params) == {
        "model.hidden": "choice([4], [8], [16])",
        "model.weight_decay": "interval(1.0, 50.0)",
    }
    assert compose_train().optimized_metric == "ofv"


def test_slurm_gpu_launcher_becomes_these_sbatch_options(hydra_configs, tmp_path, monkeypatch):
    """The launcher config as submitit turns it into an sbatch script (the plugin's own mapping
    of keys; a stand-in ``srun`` on PATH, no SLURM)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    overrides = [
        "hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100", "hydra.launcher.mem_gb=64",
        "hydra.launcher.timeout_min=240", "+hydra.launcher.additional_parameters.account=pk",
    ]
    params = OmegaConf.to_container(compose_train(*overrides, hydra=True).hydra.launcher)
    params.pop("_target_")
    # hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher.launch
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "jobs")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in base else f"slurm_{k}": v
        for k, v in params.items()
        if k not in ("submitit_folder", "max_num_timeout")
    })
    script = executor._executor._make_submission_file_text("python3 train.py", "0")
    options = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --partition=a100", "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=64GB", "#SBATCH --time=240", "#SBATCH --account=pk",
    } <= options
