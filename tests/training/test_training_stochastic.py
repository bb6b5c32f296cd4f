"""Minibatch training (method=vi) and SAEM through Lightning: sampling, resuming, data
parallelism."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from deepnlme.cli import Interrupted
from deepnlme.data import load_dataset
from deepnlme.inference.pyro.saem import SAEMEstimator
from deepnlme.inference.pyro.vi import VariationalEstimator
from deepnlme.model.zoo.pk import OneCmtOralModel
from deepnlme.training.stochastic import (
    STOP_STILL_RISING,
    SubjectSampler,
    fit_stochastic,
    still_rising,
)
from tests.test_cli import ROOT, in_process_error, run, train


@pytest.fixture(scope="module")
def in_process():
    """train.py's work in this process (overrides composed by Hydra, user errors as exit 1)."""
    from hydra import compose, initialize_config_dir

    import train as train_module
    from deepnlme.training import build

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):

        def train_in_process(run_dir: Path, *overrides: str) -> dict:
            cfg = compose("train", build.open_init_overrides(list(overrides)))
            with build.exit_on_user_error():
                return train_module.train(cfg, run_dir)

        yield train_in_process

TRAINER = {
    "_target_": "lightning.pytorch.Trainer",
    "accelerator": "cpu",
    "devices": 1,
    "precision": "64-true",
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
}
METHOD = {"epochs": 4, "lr": 0.05, "lr_final": 0.1, "checkpoint_every": 1000}


def test_sampler_ranks_split_each_global_batch():
    single = list(SubjectSampler(10, 4, seed=3))
    ranks = [list(SubjectSampler(10, 4, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(b) for b in single] == [4, 4, 2]
    for whole, a, b in zip(single, *ranks, strict=True):
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(whole)
    again = SubjectSampler(10, 4, seed=3)
    assert list(again) == single
    again.set_epoch(1)
    assert list(again) != single
    assert sorted(i for b in again for i in b) == list(range(10))


class StopAfter(Callback):
    """Stops the fit after ``epochs`` epochs (a killed run)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def fit(out: Path, ckpt_path=None, callbacks=()):
    pop = load_dataset("theophylline")
    model = OneCmtOralModel()
    est = VariationalEstimator(model, guide="amortized", hidden=16, seed=5)
    fit_stochastic(
        METHOD, TRAINER, est, pop, 4, 7, torch.float64, out, {}, ckpt_path, list(callbacks)
    )
    return torch.cat([p.detach().flatten() for p in [*model.parameters(), *est.guide.parameters()]])


def test_killed_fit_resumes_on_the_same_trajectory(tmp_path):
    straight = fit(tmp_path / "a")
    fit(tmp_path / "b", callbacks=[StopAfter(2)])
    resumed = fit(tmp_path / "c", ckpt_path=tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert not torch.equal(straight, fit(tmp_path / "d", callbacks=[StopAfter(2)]))
    assert torch.allclose(resumed, straight, rtol=1e-10, atol=1e-12)


class SignalMidEpoch(Callback):
    """Sends ``signum`` to this process after the first step of epoch ``epoch``."""

    def __init__(self, signum: int, epoch: int):
        self.signum, self.epoch = signum, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_the_end_of_the_epoch_and_the_fit_resumes(tmp_path, signum):
    straight = fit(tmp_path / "a")
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as stopped:
        fit(tmp_path / "b", callbacks=[SignalMidEpoch(signum, epoch=1)])
    name = signal.Signals(signum).name
    # 12 subjects in batches of 4: the epoch under way (steps 4-6) is finished, then saved
    assert str(stopped.value) == (
        f"fit interrupted by {name} after 6 steps; resume with ckpt_path={last}"
    )
    assert stopped.value.exit_status == 128 + signum
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 6
    assert signal.getsignal(signum) is before  # the handler is restored after the fit
    resumed = fit(tmp_path / "c", ckpt_path=last)
    assert torch.allclose(resumed, straight, rtol=1e-10, atol=1e-12)


class CopyCheckpoint(Callback):
    """Copies last.ckpt to ``target`` as epoch ``epoch`` starts: the state a fit killed then
    would leave behind (the fit itself goes on)."""

    def __init__(self, source: Path, target: Path, epoch: int):
        self.source, self.target, self.epoch = source, target, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            shutil.copy(self.source, self.target)


def fit_saem(out: Path, ckpt_path=None, callbacks=()):
    """12 SAEM iterations (6 exploration, 6 smoothing), a checkpoint every 2."""
    pop = load_dataset("theophylline", dtype=torch.float64)
    model = OneCmtOralModel().double()
    est = SAEMEstimator(model, n_explore=6, n_smooth=6, n_anneal=3, seed=3)
    method = {"checkpoint_every": 2}
    fit_stochastic(
        method, TRAINER, est, pop, None, 7, torch.float64, out, {}, ckpt_path, list(callbacks)
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()]), est


def test_killed_saem_fit_resumes_on_the_same_trajectory(tmp_path):
    mid = tmp_path / "mid.ckpt"
    copy = CopyCheckpoint(tmp_path / "a" / "checkpoints" / "last.ckpt", mid, epoch=9)
    straight, whole = fit_saem(tmp_path / "a", callbacks=[copy])
    saved = torch.load(mid, weights_only=True)
    assert saved["saem_state"]["iteration"] == 8  # written during the fit, while smoothing
    resumed, est = fit_saem(tmp_path / "b", ckpt_path=mid)
    assert [h["iteration"] for h in est.history] == list(range(12))
    assert torch.allclose(resumed, straight, rtol=1e-10, atol=1e-12)
    assert torch.allclose(est.state.eta, whole.state.eta, rtol=1e-10, atol=1e-12)
    assert est.history[-1]["q"] == pytest.approx(whole.history[-1]["q"], rel=1e-10)


VI = ("model=one_cmt_oral", "data=theophylline", "method=vi", "loglik_is=false",
      "data.batch_subjects=4", "method.epochs=2", "trainer.enable_progress_bar=false")


def test_two_processes_match_one(tmp_path, in_process):
    """trainer.devices=2 strategy=ddp (gloo on CPU): each rank takes half of each global batch
    of 4 subjects; after the same 6 steps the parameters equal the single-process fit's."""
    one = in_process(tmp_path / "one", *VI)
    two = train(tmp_path / "two", *VI, "trainer.devices=2", "trainer.strategy=ddp")
    assert two["n_iter"] == one["n_iter"] == 6
    for name, value in one["params"].items():
        assert torch.allclose(
            torch.tensor(two["params"][name]), torch.tensor(value), rtol=1e-9, atol=0
        ), name
    assert one["params"]["tvka"] != pytest.approx(1.0, rel=1e-3)  # the fit moved


def test_bad_configurations_end_with_one_line(in_process, capsys, tmp_path):
    line = in_process_error(in_process, capsys, tmp_path, *VI, "method.guide=flow")
    assert "unknown guide 'flow'" in line
    line = in_process_error(in_process, capsys, tmp_path, *VI, "data.batch_subjects=3",
                            "trainer.devices=2", "trainer.strategy=ddp")
    assert "data.batch_subjects=3 is not divisible by the 2 devices" in line
    line = in_process_error(in_process, capsys, tmp_path, *VI, "model.init.sigma_add=1e-300")
    assert "not finite" in line
    no_eta = "model._target_=tests.inference.stochastic.test_saem.NoRandomEffects"
    line = in_process_error(in_process, capsys, tmp_path, "data=theophylline", "method=saem",
                            no_eta)
    assert "method=saem needs random effects; NoRandomEffects has none" in line


def test_vi_writes_elbo_and_predicts_new_subjects_with_the_encoder(tmp_path, in_process):
    results = in_process(tmp_path / "fit", *VI[:3], "method.guide=amortized", "method.epochs=40",
                    "method.estimator.encoder_steps=50", "loglik_is_samples=200",
                    "trainer.enable_progress_bar=false")
    assert results["encoder_seconds"] > 0  # the encoder phase ran before the last checkpoint
    assert results["elbo"] <= results["loglik_is"] + 4 * results["loglik_is_se"]
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    proc = run("predict.py", f"ckpt_path={ckpt}", "loglik_is=true", "seed=12345",
               "loglik_is_samples=200", f"hydra.run.dir={tmp_path / 'pred'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred = json.loads((tmp_path / "pred" / "results.json").read_text())
    # the encoder travelled in the checkpoint: same q(η), same draws, same estimate
    assert pred["loglik_is"] == pytest.approx(results["loglik_is"], abs=1e-8)
    import pandas as pd

    fit_ebes = pd.read_csv(tmp_path / "fit" / "ebes.csv")
    new_ebes = pd.read_csv(tmp_path / "pred" / "ebes.csv")
    assert new_ebes["eta_cl"].to_numpy() == pytest.approx(fit_ebes["eta_cl"].to_numpy())


def test_still_rising_is_a_trend_of_the_last_epochs_beyond_its_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(100, generator=g, dtype=torch.float64).tolist()
    flat = [-180.0 + 0.5 * e for e in noise]
    rising = [-200.0 + 0.5 * i + 0.5 * e for i, e in enumerate(noise)]
    assert not still_rising(flat)
    assert still_rising(rising)
    assert not still_rising(rising[:9])  # fewer than 10 epochs: no judgement
    assert not still_rising([-180.0 + 0.0005 * i for i in range(100)])  # 0.005 nats: level
    falling = [-b - 400.0 for b in rising]
    assert not still_rising(falling)


def test_a_vi_fit_stopped_while_its_bound_rises_is_not_converged(tmp_path):
    pop = load_dataset("theophylline")
    est = VariationalEstimator(OneCmtOralModel(), guide="subject", num_particles=8, seed=5)
    method = {**METHOD, "epochs": 20, "lr": 0.01}  # 20 full-batch steps: far from the optimum
    _, summary = fit_stochastic(method, TRAINER, est, pop, None, 7, torch.float64, tmp_path,
                                {})
    assert summary["n_iter"] == 20 and not summary["converged"]
    assert summary["stop_reason"] == STOP_STILL_RISING
    assert summary["warnings"][0].startswith(
        "the fit did not converge: its bound was still rising over the last epochs"
    )
