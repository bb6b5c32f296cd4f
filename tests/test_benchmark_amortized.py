"""scripts/benchmark_amortized.py --model neural_pk: the main job's model, fitted parameters,
mode search and held-out subjects come from a checkpoint of ``train.py``."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deepnlme.data.split import split_heldout
from deepnlme.data.synthetic import synthetic_pk
from deepnlme.fitted import STATE_PREFIX, checkpoint_metadata
from deepnlme.inference.inner import InnerOptions
from deepnlme.model.zoo.neural_ode import NeuralODEPKModel
from deepnlme.training import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_amortized", ROOT / "scripts" / "benchmark_amortized.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def main_job_checkpoint(path: Path, *overrides: str) -> tuple[Path, dict]:
    """A checkpoint as ``python3 train.py [overrides]`` writes it (the untrained model with
    tvcl changed, standing in for fitted weights); returns it and the resolved config."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", list(overrides))
    config = OmegaConf.to_container(cfg, resolve=True)
    model, _ = build.build_model(cfg.model, torch.float64)
    state = {STATE_PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    state[STATE_PREFIX + "tvcl.raw"] += 0.5  # log scale
    torch.save(
        {
            "state_dict": state,
            "deepnlme": checkpoint_metadata(
                config, list(config["data"]["covariates"]), torch.float64, {"method": "focei"}
            ),
        },
        path,
    )
    return path, config


def test_main_job_setup_reads_model_split_and_mode_search_from_the_checkpoint(
    bench, tmp_path
):
    path, config = main_job_checkpoint(tmp_path / "last.ckpt", "data.n_subjects=12")
    setup = bench.main_job_setup(path, 5, torch.device("cpu"))
    data = config["data"]

    assert isinstance(setup.model, NeuralODEPKModel)
    # the checkpoint's weights (tvcl's raw value moved by 0.5 from the config's init)
    tvcl = float(setup.model.param_values()["tvcl"].detach())
    assert tvcl == pytest.approx(config["model"]["init"].get("tvcl", 5.0) * math.exp(0.5))
    # the main job's mode search: the focei defaults with its model_method settings
    method = config["method"]["estimator"]["inner"]
    assert setup.inner == InnerOptions(**method)
    assert asdict(setup.inner)["value_differences"] == 0 and setup.inner.chord_iter == 0
    # the main job's subjects and split
    pop = synthetic_pk(12, seed=int(data["seed"]))
    fit_pop, held = split_heldout(pop, data["heldout_fraction"], data["split_seed"])
    assert list(setup.fit_pop.ids) == list(fit_pop.ids)
    assert list(setup.held.ids) == list(held.ids)
    torch.testing.assert_close(setup.held.obs_dv, held.obs_dv)
    # new subjects: the same design, the next data seed
    assert len(setup.new) == 5
    other = synthetic_pk(5, seed=int(data["seed"]) + 1)
    torch.testing.assert_close(setup.new.obs_dv, other.obs_dv)
    assert setup.info["data"]["n_subjects"] == 12


def test_main_job_setup_refuses_another_model(bench, tmp_path):
    path, _ = main_job_checkpoint(tmp_path / "last.ckpt", "model=one_cmt_oral")
    with pytest.raises(SystemExit, match="OneCmtOralModel fit, not the main job's"):
        bench.main_job_setup(path, 5, torch.device("cpu"))


def test_main_job_setup_refuses_a_file_that_is_no_checkpoint_in_one_line(bench, tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: .*empty\.ckpt: empty file, not a checkpoint$"):
        bench.main_job_setup(path, 5, torch.device("cpu"))
