"""`python -m sketchsweep.doctor` against real stores in temporary folders (run in-process:
the checks are the same, without paying for torch and MLflow imports again)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from sketchsweep.cli import redact
from sketchsweep.doctor import main


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """A real SQLite store (created once: MLflow's migrations take seconds) with one real run."""
    folder = tmp_path_factory.mktemp("doctor-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sketchsweep", artifact_location=(folder / "sketchsweep").as_uri())
    client.set_terminated(client.create_run(exp).info.run_id)
    return uri, folder


def test_doctor_passes_and_leaves_no_trace(store, tmp_path, capsys):
    uri, folder = store
    before = sorted(p.name for p in folder.iterdir())
    journal = tmp_path / "optuna" / "study.journal"
    assert main([f"mlflow.tracking_uri={uri}", f"hydra.sweeper.storage={journal}", "model.width=16"]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "cuda:0" in out
    else:
        assert "no CUDA device: training runs on the CPU" in out
    assert "✓ cpu:" in out and "ms/step" in out
    assert f"MLflow tracking store: {uri}" in out and "ignored (not checked here): model.width=16" in out
    assert "✗" not in out and "check(s) passed" in out
    # The throwaway run, its artifacts and the doctor's experiment are gone for good.
    client = MlflowClient(uri)
    assert {e.name for e in client.search_experiments(view_type=ViewType.ALL)} == {"sketchsweep", "Default"}
    assert len(client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])) == 1
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (tmp_path / "optuna").exists()  # the scratch journal and the folder made for it


def test_broken_tracking_uri_fails_and_names_it(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be\n")
    uri = f"sqlite:///{blocker / 'mlruns' / 'mlflow.db'}"
    assert main([f"mlflow.tracking_uri={uri}", "--only", "mlflow"]) == 1
    out = capsys.readouterr().out
    assert f"✗ {uri}" in out and "is a file, not a folder" in out
    assert "1 problem(s)" in out


def test_broken_optuna_storage_fails_and_names_it(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    journal = blocker / "study.journal"
    bad_db = f"sqlite:///{tmp_path / 'missing' / 'folder' / 'optuna.db'}"
    for storage in (str(journal), bad_db):
        assert main([f"hydra.sweeper.storage={storage}", "--only", "optuna"]) == 1
        out = capsys.readouterr().out
        assert f"✗ {storage}" in out and "1 problem(s)" in out, out
    # A driver that is not installed fails too, and a password in the URL is never printed.
    assert main(["hydra.sweeper.storage=postgresql+nosuchdriver://u:pw@localhost/db", "--only", "optuna"]) == 1
    out = capsys.readouterr().out
    assert "u:***@localhost" in out and ":pw@" not in out


def test_cuda_required_without_cuda_fails(store, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    uri, _ = store
    assert (
        main([f"mlflow.tracking_uri={uri}", f"hydra.sweeper.storage={tmp_path / 's.journal'}", "trainer.device=cuda"])
        == 1
    )
    assert "trainer.device=cuda, but there is no CUDA device" in capsys.readouterr().out


def test_redact_and_usage_errors(capsys):
    assert redact("postgresql+psycopg://me:s3cret@db:5432/x") == "postgresql+psycopg://me:***@db:5432/x"
    assert main(["not-a-setting"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(["--only", "gpu"]) == 2
    assert "expected some of system,mlflow,optuna" in capsys.readouterr().err
