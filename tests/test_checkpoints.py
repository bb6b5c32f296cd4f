"""Checkpoints from anywhere: unreadable, crafted or broken files are refused with one line, no
code in them runs, and a checkpoint's class path is imported only from trusted modules."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import predict as predict_module
import train as train_module
from deepnlme import cli
from deepnlme.fitted import CHECKPOINT_KEY, FittedModel, checkpoint_metadata, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
THEO = ("model=one_cmt_oral", "data=theophylline", "se=false", "trainer.enable_progress_bar=false")


@pytest.fixture(scope="module")
def commands():
    """``run(step, config, run_dir, *overrides)``: a command's step in this process, user
    errors as one line on stderr and SystemExit."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):

        def run(step, config: str, run_dir: Path, *overrides: str):
            cfg = compose(config, cli.open_init_overrides(list(overrides)))
            run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it for the commands
            with cli.exit_on_user_error():
                return step(cfg, run_dir)

        yield run


@pytest.fixture(scope="module")
def theo_ckpt(commands, tmp_path_factory) -> Path:
    """A Theophylline checkpoint after two epochs (the weights are what matters here)."""
    run_dir = tmp_path_factory.mktemp("theo")
    commands(train_module.train, "train", run_dir, *THEO, "trainer.max_epochs=2")
    return run_dir / "checkpoints" / "last.ckpt"


def predict_error(commands, capsys, tmp_path, ckpt: Path, *overrides: str) -> str:
    """The one stderr line of ``predict.py ckpt_path=ckpt`` (exit status 1)."""
    capsys.readouterr()  # what earlier steps of the test wrote
    with pytest.raises(SystemExit) as stopped:
        commands(
            predict_module.predict, "predict", tmp_path / "out", f"ckpt_path={ckpt}", *overrides
        )
    assert stopped.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def crafted(theo_ckpt: Path, path: Path, edit) -> Path:
    """A copy of ``theo_ckpt`` changed by ``edit(checkpoint)``, saved at ``path``."""
    checkpoint = torch.load(theo_ckpt, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_plain_pickle_legacy_and_empty_files_are_one_line(commands, capsys, tmp_path):
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"state_dict": {}, CHECKPOINT_KEY: {}}))
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    not_zip = "not a deepnlme checkpoint (not a zip-format torch file; plain pickles and legacy"
    for path, expected in ((plain, not_zip), (legacy, not_zip), (empty, "empty file")):
        line = predict_error(commands, capsys, tmp_path, path)
        assert line.startswith(f"error: cannot load checkpoint {path}: {expected}"), line
    line = predict_error(commands, capsys, tmp_path, tmp_path / "missing.ckpt")
    assert line == f"error: cannot load checkpoint {tmp_path / 'missing.ckpt'}: file not found"


def test_plain_pickle_from_the_command_line_is_one_line(tmp_path):
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    proc = subprocess.run(
        [sys.executable, "predict.py", f"ckpt_path={plain}", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot load checkpoint {plain}: not a deepnlme checkpoint (not a zip-format "
        "torch file; plain pickles and legacy torch files are not read)"
    ]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"x": _Payload(marker)}}, path)
    with pytest.raises(ValueError, match=r"refused, not plain data \(.*GLOBAL"):
        read_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_class_path_is_imported_only_from_trusted_modules(theo_ckpt, tmp_path):
    def name_module_this(checkpoint):
        checkpoint[CHECKPOINT_KEY]["config"]["model"]["_target_"] = "this.Zen"

    path = crafted(theo_ckpt, tmp_path / "this.ckpt", name_module_this)
    code = textwrap.dedent(f"""
        import sys
        from deepnlme.fitted import FittedModel
        try:
            FittedModel.load({str(path)!r})
        except ValueError as exc:
            print(exc)
        print("imported" if "this" in sys.modules else "not imported")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        f"{path}: the checkpoint names 'this.Zen'; loading would import module 'this', which is "
        "not trusted: if you trust it, add trusted_modules=[this]",
        "not imported",
    ]


def test_untrusted_estimator_class_is_refused(theo_ckpt, tmp_path):
    def estimator_elsewhere(checkpoint):
        checkpoint[CHECKPOINT_KEY]["config"]["method"]["estimator"]["_target_"] = "json.JSONDecoder"

    path = crafted(theo_ckpt, tmp_path / "estimator.ckpt", estimator_elsewhere)
    with pytest.raises(ValueError, match="import module 'json', which is not trusted"):
        FittedModel.load(path)


USER_MODEL = '''
    from deepnlme.model.zoo.pk import OneCmtOralModel


    class TrustedOneCmt(OneCmtOralModel):
        """The bundled model under a user module's name."""
'''


def test_user_model_needs_trusted_modules_to_reload(commands, capsys, tmp_path, monkeypatch):
    (tmp_path / "trustmodels.py").write_text(textwrap.dedent(USER_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "fit"
    commands(
        train_module.train, "train", run_dir, *THEO, "model=custom",
        "model._target_=trustmodels.TrustedOneCmt", "trainer.max_epochs=1",
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    line = predict_error(commands, capsys, tmp_path, ckpt, "data=theophylline")
    assert line.endswith(
        "the checkpoint names 'trustmodels.TrustedOneCmt'; loading would import module "
        "'trustmodels', which is not trusted: if you trust it, add trusted_modules=[trustmodels]"
    )
    line = predict_error(commands, capsys, tmp_path, ckpt, "trusted_modules=[trust-models]")
    assert line == "error: trusted_modules: ['trust-models'] are not module names (e.g. mymodels)"
    r = commands(
        predict_module.predict, "predict", tmp_path / "p", f"ckpt_path={ckpt}",
        "data=theophylline", "trusted_modules=[trustmodels]",
    )
    assert r["n_subjects"] == 12 and r["loglik"] < 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(commands, capsys, theo_ckpt, tmp_path, bad):
    def spoil(checkpoint):
        checkpoint["state_dict"]["model.tvcl.raw"].fill_(bad)

    path = crafted(theo_ckpt, tmp_path / "spoiled.ckpt", spoil)
    line = predict_error(commands, capsys, tmp_path, path)
    assert line == (
        f"error: cannot load checkpoint {path}: weights are not finite (NaN or inf): tvcl.raw"
    )


def test_checkpoint_cannot_name_arbitrary_callables(tmp_path):
    config = {
        "model": {"_target_": "os.system", "command": "echo hacked"},
        "method": {"estimator": {"_target_": "deepnlme.inference.laplace.LaplaceEstimator"}},
    }
    path = tmp_path / "evil.ckpt"
    metadata = checkpoint_metadata(config, [], torch.float64)
    torch.save({"state_dict": {}, CHECKPOINT_KEY: metadata}, path)
    with pytest.raises(ValueError, match="import module 'os', which is not trusted"):
        FittedModel.load(path)
    # even from a trusted module, only NLMEModel classes are called
    with pytest.raises(ValueError, match="is not a NLMEModel class"):
        FittedModel.load(path, trusted_modules=["os"])


def test_resume_from_missing_or_foreign_checkpoint_is_one_line(
    commands, capsys, theo_ckpt, tmp_path
):
    for ckpt, expected in (
        (tmp_path / "missing.ckpt", f"{tmp_path / 'missing.ckpt'}: file not found"),
        (theo_ckpt, f"{theo_ckpt}: it was written by another model or method (weights differ: "),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            commands(
                train_module.train, "train", tmp_path / "resumed", "model=two_cmt_oral",
                *THEO[1:], f"ckpt_path={ckpt}",
            )
        assert stopped.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: cannot resume from ckpt_path {expected}"
        ), lines
