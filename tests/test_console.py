"""What the commands print: their own lines, not third-party chatter (onnx_ir's pass log while a
run exports its model, MLflow's download bars for a ``runs:/`` reference)."""

from __future__ import annotations

import numpy as np
import pytest

from sketchsweep import evaluate, export, predict
from tests.conftest import tiny_overrides, train_cli

BARS = "Downloading artifacts"  # MLflow's tqdm bars, drawn on stderr


@pytest.fixture(scope="module")
def exported_run(tiny_data, tmp_path_factory):
    """One epoch trained by the real command with its ONNX export on: its output, store and run id."""
    tmp = tmp_path_factory.mktemp("console")
    store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    run_dir = tmp / "run"
    overrides = tiny_overrides(tiny_data, store, run_dir, "trainer.epochs=1", "mlflow.log_onnx=true")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # as in test_export: tiny batches gain nothing from two threads
        proc = train_cli(overrides, cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from sketchsweep.checkpoint import load_trained

    return proc, run_dir, store, load_trained(run_dir).run_id


def test_a_run_that_exports_onnx_prints_no_onnx_ir_pass_log(exported_run):
    proc, run_dir, _, _ = exported_run
    assert (run_dir / "model.onnx").is_file()  # the export ran
    assert "ONNX Runtime matches PyTorch" in proc.stdout + proc.stderr  # and said so in our words
    assert "onnx_ir" not in proc.stdout + proc.stderr
    assert "INFO mlflow" not in proc.stdout + proc.stderr  # "Validating input example ...", table creation


@pytest.mark.parametrize("command", ["export", "predict", "evaluate"])
def test_a_runs_reference_is_read_without_mlflow_download_bars(exported_run, command, tmp_path, monkeypatch, capfd):
    _, _, store, run_id = exported_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)  # MLflow's default: bars on
    monkeypatch.chdir(tmp_path)
    ref = f"runs:/{run_id}"
    if command == "export":
        assert export.main([ref, "--out", str(tmp_path / "m.onnx")]) == 0
    elif command == "predict":
        np.save(tmp_path / "x.npy", np.zeros((2, 784), np.uint8))
        assert predict.main([ref, str(tmp_path / "x.npy")]) == 0
    else:
        assert evaluate.main([ref, "--out", str(tmp_path / "eval")]) == 0
    out, err = capfd.readouterr()
    assert out.strip(), "the command printed its result"
    assert BARS not in err and BARS not in out
