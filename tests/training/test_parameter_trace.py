"""ParameterTrace: one row per L-BFGS iteration (its best evaluation), parameters by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepnlme.model.zoo.pk import OneCmtOralModel
from deepnlme.training import ParameterTrace


class FakeLBFGS:
    def __init__(self):
        self.state = {}
        self.param_groups = [{"params": []}]


def test_trace_keeps_the_best_evaluation_of_each_iteration(monkeypatch):
    model = OneCmtOralModel()
    trace = ParameterTrace()
    trainer = SimpleNamespace(optimizers=[FakeLBFGS()])
    module = SimpleNamespace(estimator=SimpleNamespace(model=model))
    iterations = iter([0, 1, 1, 2, 2])
    monkeypatch.setattr(
        "deepnlme.training.callbacks.lbfgs_iterations", lambda optimizer: next(iterations)
    )
    for loss, tvka in [(10.0, 1.0), (8.0, 1.2), (9.0, 1.5), (1e15, 9.0), (7.0, 1.3)]:
        model.tvka.set_value(tvka, "tvka")
        trace.on_before_backward(trainer, module, torch.tensor(loss))
    table = trace.table()
    assert table["iteration"].tolist() == [0, 1, 2]
    assert table["objective"].tolist() == [10.0, 8.0, 7.0]  # 9.0 tried, 1e15 infeasible
    assert table["tvka"].tolist() == pytest.approx([1.0, 1.2, 1.3])
    assert {"omega[ka,ka]", "omega[cl,cl]", "omega[v,v]", "sigma_add"} <= set(table.columns)
    assert ParameterTrace().table() is None
