"""deepnlme.cli: user errors become one line and exit status 1, other errors stay errors."""

from __future__ import annotations

import pytest

from deepnlme import cli
from deepnlme.data.errors import DataValidationError


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (cli.SetupError("model config needs a _target_"), "error: model config needs a _target_"),
        (DataValidationError("a.csv: row 2, column DV:\n  bad"),
         "error: a.csv: row 2, column DV: bad"),
    ],
)
def test_user_errors_are_one_line_and_status_1(capsys, error, line):
    with pytest.raises(SystemExit) as stopped, cli.exit_on_user_error():
        raise error
    assert stopped.value.code == 1
    assert capsys.readouterr().err.splitlines() == [line]


def test_interrupted_fit_exits_with_128_plus_the_signal(capsys):
    with pytest.raises(SystemExit) as stopped, cli.exit_on_user_error():
        raise cli.Interrupted("fit interrupted by SIGTERM", 15)
    assert stopped.value.code == 143
    assert capsys.readouterr().err.splitlines() == ["stopped: fit interrupted by SIGTERM"]


@pytest.mark.parametrize("error", [ValueError("internal"), RuntimeError("bug"), KeyError("k")])
def test_other_errors_are_not_swallowed(capsys, error):
    with pytest.raises(type(error)), cli.exit_on_user_error():
        raise error
    assert capsys.readouterr().err == ""
