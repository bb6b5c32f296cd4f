"""simulate.py: replicates of a fitted model's design and the visual predictive check (VPC)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure

import simulate as simulate_module
import train as train_module
from deepnlme.diagnostics.vpc import (
    STAT_COLUMNS,
    assign_bins,
    time_bin_edges,
    vpc_coverage,
    vpc_figure,
    vpc_statistics,
)
from deepnlme.training import build
from tests.test_cli import ROOT, THEO, run, user_error

SIM_COLUMNS = ["REP", "ID", "TIME", "DV", "IPRED", "CMT", "eta_ka", "eta_cl", "eta_v"]


def observations(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """A hand-made observed table: two CMTs, continuous times (no ties), DV ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "ID": np.arange(n) % 10,
        "TIME": rng.uniform(0.0, 24.0, n),
        "DV": rng.normal(size=n),
        "CMT": np.where(np.arange(n) < 2 * n // 3, 1, 2),
    })


def replicates(observed: pd.DataFrame, shifts: list[float]) -> pd.DataFrame:
    """Replicate r (1-based) of ``observed`` with DV + shifts[r - 1]."""
    return pd.concat(
        [observed.assign(REP=r, DV=observed["DV"] + s) for r, s in enumerate(shifts, 1)],
        ignore_index=True,
    )


# ----------------------------------------------------------------------------- VPC statistics
def test_simulations_equal_to_the_observations_collapse_onto_them():
    observed = observations()
    stats = vpc_statistics(observed, replicates(observed, [0.0] * 5))
    assert list(stats.columns) == STAT_COLUMNS
    assert len(stats) == 2 * 8 * 3  # CMTs x bins x quantiles
    for column in ("sim_lo", "sim_median", "sim_hi"):
        np.testing.assert_allclose(stats[column], stats["observed"], rtol=0, atol=1e-12)
    assert vpc_coverage(stats) == 1.0
    # the bins of each CMT cover all its observations, in about equal numbers
    counts = stats[stats["quantile"] == 0.5].groupby("CMT")["n_obs"]
    assert counts.sum().to_dict() == observed["CMT"].value_counts().to_dict()
    assert (counts.max() - counts.min()).max() <= 1
    # the observed percentiles are those of each bin's DVs
    cmt1 = observed[observed["CMT"] == 1]
    in_bin = assign_bins(cmt1["TIME"].to_numpy(), time_bin_edges(cmt1["TIME"].to_numpy(), 8))
    row = stats[(stats["CMT"] == 1) & (stats["bin"] == 3) & (stats["quantile"] == 0.95)]
    assert row["observed"].item() == pytest.approx(np.quantile(cmt1["DV"][in_bin == 3], 0.95))
    assert row["time_mid"].item() == pytest.approx(np.median(cmt1["TIME"][in_bin == 3]))


def test_simulated_bands_are_percentiles_across_replicates():
    """Replicate r is the data shifted by r (r = 1..101): every simulated percentile of
    replicate r is the observed one + r, so the 90% band is observed + [6, 96], median + 51."""
    observed = observations()
    stats = vpc_statistics(observed, replicates(observed, list(range(1, 102))), bins=4)
    assert stats["bin"].nunique() == 4
    np.testing.assert_allclose(stats["sim_lo"] - stats["observed"], 6.0, atol=1e-9)
    np.testing.assert_allclose(stats["sim_median"] - stats["observed"], 51.0, atol=1e-9)
    np.testing.assert_allclose(stats["sim_hi"] - stats["observed"], 96.0, atol=1e-9)
    assert vpc_coverage(stats) == 0.0
    narrow = vpc_statistics(observed, replicates(observed, list(range(-50, 51))), interval=0.5)
    np.testing.assert_allclose(narrow["sim_hi"] - narrow["observed"], 25.0, atol=1e-9)
    assert vpc_coverage(narrow) == 1.0


def test_a_compartment_without_simulations_has_empty_bands():
    observed = observations()
    stats = vpc_statistics(observed, replicates(observed[observed["CMT"] == 1], [-1.0, 1.0]))
    assert stats.loc[stats["CMT"] == 2, ["sim_lo", "sim_median", "sim_hi"]].isna().all().all()
    assert stats.loc[stats["CMT"] == 1, "sim_hi"].notna().all()
    assert vpc_coverage(stats) == pytest.approx(0.5)


def test_time_bins_merge_tied_edges_and_cover_every_time():
    time = np.array([0.0] * 10 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    edges = time_bin_edges(time, 8)
    assert edges[0] == 0.0 and edges[-1] == 6.0 and np.all(np.diff(edges) > 0)
    index = assign_bins(time, edges)
    assert index.min() == 0 and index.max() == len(edges) - 2
    assert (index[:10] == 0).all()
    last = len(edges) - 2
    assert assign_bins(np.array([-1.0, 6.0, 99.0]), edges).tolist() == [0, last, last]
    assert time_bin_edges(np.array([2.0, 2.0]), 3).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="bins"):
        time_bin_edges(time, 0)
    with pytest.raises(ValueError, match="quantiles"):
        vpc_statistics(observations(), replicates(observations(), [0.0]), quantiles=[0.5, 1.5])


def test_vpc_figure_has_a_panel_per_compartment():
    observed = observations()
    simulated = replicates(observed, list(np.linspace(-1.0, 1.0, 20)))
    fig = vpc_figure(observed, simulated, bins=5, log_y=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert vpc_figure(observed, simulated).axes[0].get_yscale() == "linear"


# ---------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def commands_in_process():
    """``compose(config, overrides)`` -> ``step(cfg, run_dir)`` in this process, user errors
    as one line on stderr and exit status 1."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):

        def run_in_process(step, config: str, run_dir: Path, *overrides: str) -> dict:
            cfg = compose(config, build.open_init_overrides(list(overrides)))
            with build.exit_on_user_error():
                return step(cfg, run_dir)

        yield run_in_process


@pytest.fixture(scope="module")
def theo_ckpt(commands_in_process, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("theo_fit")
    commands_in_process(
        train_module.train, "train", run_dir, *THEO, "se=false", "trainer.enable_progress_bar=false"
    )
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def theo_simulation(theo_ckpt, tmp_path_factory) -> Path:
    """``python simulate.py`` of the Theophylline fit: 50 replicates, seed 1."""
    run_dir = tmp_path_factory.mktemp("theo_sim")
    proc = run(
        "simulate.py", f"ckpt_path={theo_ckpt}", "n_replicates=50", "seed=1",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_simulate_writes_replicates_and_vpc(theo_simulation, theo_ckpt):
    run_dir = theo_simulation
    for name in ("simulations.csv", "vpc.csv", "vpc.png", "results.json", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    r = json.loads((run_dir / "results.json").read_text())
    # names from the checkpoint (fitted in process: no Hydra choice, the class name)
    assert (r["model"], r["method"], r["data"]) == ("OneCmtOralModel", "laplace", "theophylline")
    assert (r["n_replicates"], r["seed"], r["n_subjects"], r["n_obs"]) == (50, 1, 12, 132)
    assert r["ckpt_path"] == str(theo_ckpt)
    assert r["vpc_coverage"] >= 0.6  # correctly specified model

    sims = pd.read_csv(run_dir / "simulations.csv")
    assert list(sims.columns) == SIM_COLUMNS
    assert len(sims) == 50 * 132 and sorted(sims["REP"].unique()) == list(range(1, 51))
    first, second = (sims[sims["REP"] == r].reset_index(drop=True) for r in (1, 2))
    pd.testing.assert_frame_equal(first[["ID", "TIME", "CMT"]], second[["ID", "TIME", "CMT"]])
    assert not np.allclose(first["DV"], second["DV"])
    assert sims.groupby(["REP", "ID"])["eta_cl"].nunique().max() == 1  # one η per subject
    assert sims.groupby(["REP", "ID"])["eta_cl"].first().std() > 0

    stats = pd.read_csv(run_dir / "vpc.csv")
    assert list(stats.columns) == STAT_COLUMNS
    assert stats.groupby("quantile")["n_obs"].sum().tolist() == [132] * 3
    assert vpc_coverage(stats) == pytest.approx(r["vpc_coverage"])
    after_dose = stats[(stats["quantile"] == 0.5) & (stats["time_mid"] > 0)]
    ratio = after_dose["sim_median"] / after_dose["observed"]
    assert len(after_dose) >= 6 and ratio.between(0.5, 2.0).all(), ratio.tolist()


@pytest.mark.slow
def test_simulations_are_reproducible_from_the_seed(
    theo_simulation, theo_ckpt, commands_in_process, tmp_path
):
    sims = pd.read_csv(theo_simulation / "simulations.csv")
    args = (f"ckpt_path={theo_ckpt}", "n_replicates=50", "data=theophylline")
    commands_in_process(simulate_module.simulate, "simulate", tmp_path / "a", *args, "seed=1")
    commands_in_process(simulate_module.simulate, "simulate", tmp_path / "b", *args, "seed=2")
    again, other = (pd.read_csv(tmp_path / d / "simulations.csv") for d in ("a", "b"))
    pd.testing.assert_frame_equal(again, sims)
    assert not np.allclose(other["DV"], sims["DV"])
    # in batches of 8 replicates (100 subjects): every replicate new, REP still 1..50
    r = commands_in_process(
        simulate_module.simulate, "simulate", tmp_path / "c", *args, "seed=1",
        "batch_subjects=100",
    )
    batched = pd.read_csv(tmp_path / "c" / "simulations.csv")
    assert sorted(batched["REP"].unique()) == list(range(1, 51))
    etas = batched.groupby("REP")["eta_cl"].first()
    assert etas.nunique() == 50
    assert r["vpc_coverage"] >= 0.6


def test_bad_ckpt_path_is_one_line_without_traceback(tmp_path):
    line = user_error(f"ckpt_path={tmp_path / 'missing.ckpt'}", script="simulate.py")
    assert line.startswith("error: cannot load checkpoint ")


def test_bad_replicate_count_is_one_line(commands_in_process, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        commands_in_process(
            simulate_module.simulate, "simulate", tmp_path, "ckpt_path=x.ckpt", "n_replicates=0"
        )
    assert stopped.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: n_replicates")
