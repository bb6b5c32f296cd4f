"""Lightning orchestration: module + full-batch data + callbacks fit Theophylline; the
checkpoint is plain data and reloads into a FittedModel that predicts and simulates."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from deepnlme.data import load_dataset
from deepnlme.fitted import CHECKPOINT_KEY, FittedModel, checkpoint_metadata, default_dtype
from deepnlme.inference import Laplace, OuterOptions
from deepnlme.model.zoo.pk import OneCmtOralModel
from deepnlme.training import (
    ConvergenceMonitor,
    FitTimer,
    NLMEFitModule,
    PopulationDataModule,
)

CONFIG = {
    "model": {"_target_": "deepnlme.model.zoo.pk.OneCmtOralModel", "init": {}, "fixed": []},
    "method": {
        "estimator": {
            "_target_": "deepnlme.inference.laplace.LaplaceEstimator",
            "hessian": "exact",
            "interaction": True,
            "name": "laplace",
            "inner": {"max_iter": 100, "gtol": 1e-6},
        }
    },
    "data": {"name": "theophylline", "covariates": ["WT"]},
}


def fit(directory, max_epochs: int = 1000, ckpt_path=None):
    pop = load_dataset("theophylline", dtype=torch.float32)  # the DataModule casts to float64
    with default_dtype(torch.float64):
        model = OneCmtOralModel()
    estimator = Laplace(model)
    metadata = checkpoint_metadata(CONFIG, pop.covariate_names, torch.float64, {"model": "m"})
    outer = OuterOptions()
    module = NLMEFitModule(estimator, outer, iterations_per_epoch=10, metadata=metadata)
    monitor = ConvergenceMonitor(outer.gtol, outer.converged_gtol, outer.max_iter)
    timer = FitTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        callbacks=[
            monitor,
            timer,
            ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0),
        ],
    )
    trainer.fit(
        module,
        datamodule=PopulationDataModule(pop, torch.float64),
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    return model, monitor, timer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fit")
    model, monitor, timer = fit(directory)
    return directory, model, monitor, timer


@pytest.mark.slow
def test_fit_converges_to_reference(fitted):
    _, model, monitor, timer = fitted
    summary = monitor.summary()
    assert summary["converged"] is True
    assert summary["grad_max"] < 1e-3
    assert summary["n_iter"] > 10
    assert summary["stop_reason"] in ("gradient below gtol", "no progress")
    assert monitor.loglik == pytest.approx(-180.153, abs=0.01)
    assert timer.seconds > 0
    assert model.tvka.raw.dtype == torch.float64
    assert float(model.tvcl.value().detach()) == pytest.approx(0.04004, rel=0.01)


@pytest.mark.slow
def test_checkpoint_is_plain_and_reloads(fitted):
    directory, model, monitor, _ = fitted
    path = directory / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # no code runs
    assert checkpoint[CHECKPOINT_KEY]["covariate_names"] == ["WT"]
    assert checkpoint[CHECKPOINT_KEY]["config"]["model"]["_target_"].endswith("OneCmtOralModel")

    reloaded = FittedModel.load(path)
    assert reloaded.names == {"model": "m"}
    assert reloaded.dtype == torch.float64
    for name, value in model.param_values().items():
        assert torch.allclose(reloaded.model.param_values()[name], value)
    pop = load_dataset("theophylline")
    assert reloaded.loglik(pop) == pytest.approx(monitor.loglik, abs=1e-4)  # inner tolerance

    ebes, predictions = reloaded.predict(pop.subset([2, 5]))
    assert list(ebes["ID"]) == [pop.ids[2], pop.ids[5]]
    assert {"PRED", "IPRED", "IWRES"} <= set(predictions.columns)


@pytest.mark.slow
def test_simulate_is_reproducible_and_leaves_global_rng(fitted):
    directory, *_ = fitted
    reloaded = FittedModel.load(directory / "last.ckpt")
    pop = load_dataset("theophylline")
    state = torch.random.get_rng_state()
    first = reloaded.simulate(pop, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert first.equals(reloaded.simulate(pop, seed=3))
    assert not first["DV"].equals(reloaded.simulate(pop, seed=4)["DV"])
    assert list(first.columns) == ["ID", "TIME", "DV", "IPRED", "CMT", "eta_ka", "eta_cl", "eta_v"]
    assert len(first) == pop.n_obs


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tmp_path):
    _, first, _ = fit(tmp_path, max_epochs=1)
    assert first.n_iter == 10 and not first.converged
    _, resumed, _ = fit(tmp_path / "resumed", ckpt_path=tmp_path / "last.ckpt")
    assert resumed.converged
    assert resumed.loglik == pytest.approx(-180.153, abs=0.01)


def test_datamodule_moves_and_casts_the_population():
    pop = load_dataset("theophylline", dtype=torch.float32)
    dm = PopulationDataModule(pop, torch.float64)
    (batch,) = list(dm.train_dataloader())
    assert batch is pop
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved.obs_dv.dtype == torch.float64
    assert moved.obs_cmt.dtype == torch.long
    assert moved.ids == pop.ids
    # Lightning hands each epoch a copy of the batch: every epoch is served the same object
    copy = dataclasses.replace(pop)
    assert dm.transfer_batch_to_device(copy, torch.device("cpu"), 0) is moved


def test_a_lightning_fit_evaluates_no_point_twice():
    """Where one epoch's L-BFGS step ends, the next one starts: that point (and the
    monitor's, and the start check's) is remembered, not evaluated again."""
    from tests.inference.linear_model import RandomSlopeModel, random_slope_population
    from tests.inference.test_fit_loop import Counting

    pop = random_slope_population(n=8, seed=3)
    estimator = Counting(RandomSlopeModel())
    outer = OuterOptions()
    monitor = ConvergenceMonitor(outer.gtol, outer.converged_gtol, outer.max_iter)
    trainer = pl.Trainer(
        accelerator="cpu", precision="64-true", max_epochs=100, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[monitor],
    )
    trainer.fit(NLMEFitModule(estimator, outer, 4), datamodule=PopulationDataModule(pop))
    assert monitor.converged and trainer.current_epoch > 2
    distinct = {tuple(p.tolist()) for p in estimator.points}
    assert len(distinct) == len(estimator.points)


def test_training_step_is_the_estimator_loss():
    pop = load_dataset("theophylline", dtype=torch.float64)
    model = OneCmtOralModel()
    estimator = Laplace(model)
    module = NLMEFitModule(estimator)
    assert module.model is model
    loss = module.training_step(pop, 0).detach()
    assert float(loss) == pytest.approx(float(Laplace(model).loss(pop).detach()))
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.LBFGS)
    assert optimizer.defaults["max_iter"] == module.iterations_per_epoch
