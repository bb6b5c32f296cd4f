"""Interrupted fits: last.ckpt is written every epoch, SIGINT/SIGTERM stop promptly after the
current epoch, and a fit killed with SIGKILL resumes to the optimum of an uninterrupted fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train as train_module
from deepnlme import cli
from deepnlme.training.interrupt import StopOnSignal

ROOT = Path(__file__).resolve().parents[1]
# Theophylline, one-compartment oral, Laplace, 4 L-BFGS iterations per epoch (about 7 epochs to
# converge).
FIT = (
    "data=theophylline", "method=laplace", "method.iterations_per_epoch=4", "se=false",
    "trainer.enable_progress_bar=false",
)
SLOW = ("model=custom", "model._target_=slowmodels.SlowOneCmtOral")
SLOW_MODEL = '''
    import time

    from deepnlme.model.zoo.pk import OneCmtOralModel


    class SlowOneCmtOral(OneCmtOralModel):
        """The bundled model, 5 ms slower per evaluation: a fit that lasts long enough to be
        interrupted mid-way (same numbers)."""

        def pre(self, p, eta, cov):
            time.sleep(0.005)
            return super().pre(p, eta, cov)
'''


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory) -> Path:
    """A directory with ``slowmodels.py``: commands run there import it."""
    directory = tmp_path_factory.mktemp("slow")
    (directory / "slowmodels.py").write_text(textwrap.dedent(SLOW_MODEL))
    return directory


def start_fit(run_dir: Path, cwd: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *SLOW, *FIT, *overrides,
         f"hydra.run.dir={run_dir}"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_epoch(proc: subprocess.Popen, ckpt: Path, epoch: int, timeout: float = 300) -> int:
    """Wait until ``ckpt`` holds an epoch >= ``epoch`` (Lightning writes it atomically)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if ckpt.exists():
            saved = torch.load(ckpt, weights_only=True)["epoch"]
            if saved >= epoch:
                return saved
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout} s")


@pytest.fixture(scope="module")
def in_process():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):

        def fit(run_dir: Path, *overrides: str) -> dict:
            cfg = compose("train", list(overrides))
            with cli.exit_on_user_error():
                return train_module.train(cfg, run_dir)

        yield fit


@pytest.mark.slow
def test_fit_killed_mid_way_resumes_to_the_same_optimum(
    slow_models, in_process, tmp_path, monkeypatch
):
    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = start_fit(run_dir, slow_models)
    saved_epoch = wait_for_epoch(proc, ckpt, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()  # killed before the end
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] >= saved_epoch

    monkeypatch.syspath_prepend(str(slow_models))
    resumed = in_process(tmp_path / "resumed", *SLOW, *FIT, f"ckpt_path={ckpt}")
    whole = in_process(tmp_path / "whole", "model=one_cmt_oral", *FIT)
    assert whole["converged"] and resumed["converged"]
    assert resumed["n_iter"] > saved["callbacks"]["ConvergenceMonitor"]["n_iter"]  # went on
    assert resumed["loglik"] == pytest.approx(whole["loglik"], abs=1e-6)
    assert resumed["loglik"] == pytest.approx(-180.153, abs=0.01)
    for name in ("tvka", "tvcl", "tvv", "sigma_add"):
        assert resumed["params"][name] == pytest.approx(whole["params"][name], rel=1e-4), name
    variances = [whole["omega"]["omega"]["cov"][i][i] for i in range(3)]
    resumed_variances = [resumed["omega"]["omega"]["cov"][i][i] for i in range(3)]
    assert resumed_variances == pytest.approx(variances, rel=1e-3)


@pytest.mark.slow
def test_sigterm_stops_after_the_current_epoch_with_its_checkpoint(slow_models, tmp_path):
    signum = signal.SIGTERM
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = start_fit(run_dir, slow_models)
    epoch = wait_for_epoch(proc, ckpt, 0)
    sent = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    saved = torch.load(ckpt, weights_only=True)
    n_iter = saved["callbacks"]["ConvergenceMonitor"]["n_iter"]
    assert stopped == [
        f"stopped: fit interrupted by {name} after {n_iter} iterations; resume with "
        f"ckpt_path={ckpt}"
    ]
    assert f"{name} received: stopping after the current step" in stdout + stderr
    # the epoch under way when the signal came was finished and saved, no more
    assert saved["epoch"] in (epoch, epoch + 1)
    assert not (run_dir / "results.json").exists()
    assert elapsed < 30, elapsed  # one epoch is well under a second on an idle machine


class _Trainer:
    should_stop = False


def test_sigint_sets_the_stop_flag_instead_of_raising():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        stop, trainer = StopOnSignal(), _Trainer()
        stop.on_train_start(trainer, None)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in this (main) thread between bytecodes
        assert stop.received == signal.SIGINT and seen == []
        stop.on_train_batch_end(trainer, None, None, None, 0)
        assert trainer.should_stop
        stop.on_train_end(trainer, None)  # handlers restored
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
