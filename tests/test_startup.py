"""Start-up: ``--help``, argument errors and data errors do not load Lightning or the models
(the heavy imports happen after the data are read); a CSV table is read and checked before torch
loads. Times are in scripts/benchmark_startup.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "pandas", "matplotlib", "deepnlme.model", "deepnlme.fitted")
PROBE = """
import atexit, runpy, sys
heavy = {heavy!r}
atexit.register(lambda: print("loaded:", [m for m in heavy if m in sys.modules], file=sys.stderr))
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def loaded_modules(script: str, *args: str) -> tuple[int, list[str], list[str]]:
    """Run ``script args`` in a fresh interpreter: (exit status, other stderr lines, the
    modules of HEAVY it had loaded when it exited)."""
    code = PROBE.format(heavy=HEAVY, script=str(ROOT / script), args=list(args))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    lines = proc.stderr.strip().splitlines()
    loaded = [line for line in lines if line.startswith("loaded:")]
    assert len(loaded) == 1, proc.stderr[-3000:]
    rest = [line for line in lines if not line.startswith("loaded:")]
    return proc.returncode, rest, eval(loaded[0].removeprefix("loaded:"))  # a list literal


@pytest.mark.parametrize("script", ["train.py", "predict.py", "simulate.py"])
def test_help_loads_no_heavy_module(script):
    status, _, loaded = loaded_modules(script, "--help")
    assert status == 0 and loaded == []


def test_missing_data_file_is_answered_before_lightning_and_the_models_load(tmp_path):
    missing = tmp_path / "missing.csv"
    status, lines, loaded = loaded_modules(
        "train.py", "model=one_cmt_oral", "data=csv", f"data.path={missing}",
        f"hydra.run.dir={tmp_path}",
    )
    assert status == 1 and lines == [f"error: {missing}: file not found"]
    assert "lightning" not in loaded and "deepnlme.model" not in loaded
    assert "matplotlib" not in loaded and "deepnlme.fitted" not in loaded


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("missing.csv", None),
        ("bad_column.csv", "ID,TIME,DV,AMT,CMT\n1,0,.,100,1\n1,1,2.5,0,x\n"),
        ("bad_value.csv", "ID,TIME,DV,AMT\n1,0,.,100\n1,-1,2.5,0\n1,inf,2.5,0\n"),
    ],
)
def test_csv_data_error_is_answered_before_torch_loads(tmp_path, name, text):
    from deepnlme.data.errors import DataValidationError
    from deepnlme.data.events import read_event_table

    path = tmp_path / name
    if text is None:
        expected = f"{path}: file not found"
    else:
        path.write_text(text)
        with pytest.raises(DataValidationError) as raised:
            read_event_table(path)
        expected = str(raised.value)
    status, lines, loaded = loaded_modules(
        "train.py", "model=one_cmt_oral", "data=csv", f"data.path={path}",
        f"hydra.run.dir={tmp_path}",
    )
    assert status == 1 and lines == [f"error: {expected}"]
    assert "torch" not in loaded and "lightning" not in loaded and "deepnlme.model" not in loaded


def test_argument_error_loads_no_heavy_module(tmp_path):
    status, lines, loaded = loaded_modules("train.py", "model=no_such_model")
    assert status == 1 and loaded == []
    assert any("Could not find 'model/no_such_model'" in line for line in lines), lines
