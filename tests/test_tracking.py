"""The MLflow store at the start and end of a run, on real SQLite stores: creating a fresh store
from two processes at once, folders that cannot be written (found before training, in one line)
and an artifact write that fails (the run still says why)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sketchsweep import tracking
from tests.conftest import PROJECT_ROOT, cli_env, tiny_overrides, train_cli

# Two of these open the same fresh store when told to, as two jobs starting at once would.
OPENER = """
import sys
from sketchsweep import store, tracking
print("ready", flush=True)
for line in sys.stdin:
    how, uri = line.split()
    try:
        tracking.setup_experiment(uri, "race", None) if how == "train" else store.check_store(uri, None)
        print("ok", flush=True)
    except Exception as e:
        print("failed:", " ".join(str(e).split())[:300], flush=True)
"""


@pytest.fixture
def unwritable(tmp_path):
    """Make a folder (created) that nobody can create files in, root included: root passes every
    permission check, so as root the folder is made immutable (chattr +i)."""
    made: list[Path] = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            chattr = shutil.which("chattr")
            proc = subprocess.run([chattr or "chattr", "+i", str(folder)], capture_output=True, text=True)
            if chattr is None or proc.returncode != 0:
                pytest.skip(f"as root a folder is unwritable only when immutable; chattr +i failed: {proc.stderr}")
        made.append(folder)
        return folder

    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def ours(caplog, level: int) -> list[str]:
    """The project's log lines at ``level`` or above."""
    return [r.getMessage() for r in caplog.records if r.name == "sketchsweep" and r.levelno >= level]


@pytest.mark.slow
def test_jobs_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    """MLflow creates and migrates an empty SQLite database on first contact; two processes doing
    it at once collided (`duplicate column name: step`, `table experiments already exists`) in
    every try before creation was serialized."""
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER],
            cwd=PROJECT_ROOT,
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    hang_guard = threading.Timer(600, lambda: [p.kill() for p in openers])  # a hang fails, not blocks, the suite
    hang_guard.start()
    try:
        assert [p.stdout.readline().strip() for p in openers] == ["ready", "ready"]
        results = []
        for i, second in enumerate(["train", "doctor", "train"]):  # training, and the doctor's check
            uri = f"sqlite:///{tmp_path / f'store{i}' / 'mlruns' / 'mlflow.db'}"
            for p, how in zip(openers, ["train", second], strict=True):
                p.stdin.write(f"{how} {uri}\n")
            for p in openers:  # both lines sent before either is read: they start together
                p.stdin.flush()
            results.append([p.stdout.readline().strip() for p in openers])
        assert results == [["ok", "ok"]] * 3
        assert MlflowClient(uri).get_experiment_by_name("race") is not None
    finally:
        hang_guard.cancel()
        for p in openers:
            p.stdin.close()
            p.wait()


def test_an_unwritable_store_folder_is_one_line_before_training(tiny_data, tmp_path, unwritable):
    folder = unwritable(tmp_path / "mlruns")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    proc = train_cli(tiny_overrides(tiny_data, store, tmp_path / "run"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "epoch 1/3" not in out
    [line] = [x for x in out.splitlines() if "ERROR" in x]
    assert f"mlflow.tracking_uri={store}: cannot create files in the store's folder {folder}" in line


@pytest.mark.slow
def test_an_unwritable_artifact_root_is_found_before_training(tiny_data, tmp_path, store, unwritable):
    root = unwritable(tmp_path / "artifacts")
    proc = train_cli(tiny_overrides(tiny_data, store, tmp_path / "run", f"mlflow.artifact_root={root}"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "epoch 1/3" not in out
    [line] = [x for x in out.splitlines() if "ERROR" in x]
    assert f"mlflow.artifact_root={root}: cannot create files in {root / 'sketchsweep'}" in line
    client = MlflowClient(store)
    assert client.get_experiment_by_name("sketchsweep") is None  # nothing made that points at it


def test_an_artifact_root_under_a_file_is_named(tmp_path, store):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    with pytest.raises(tracking.TrackingError, match=f"{blocker} is a file, not a folder"):
        tracking.setup_experiment(store, "x", str(blocker / "artifacts"))


def test_a_failed_artifact_write_still_records_why_the_run_failed(tmp_path, store, unwritable, caplog):
    """The run's artifact folder turns unwritable mid-run: writing ``error.txt`` fails too, and
    used to fail before the reason was recorded."""
    exp_id = tracking.setup_experiment(store, "x", None)
    weights = tmp_path / "model_weights.pth"
    weights.write_bytes(b"weights")
    with (
        pytest.raises(tracking.TrackingError, match=r"could not store model_weights\.pth"),
        tracking.Run(store, exp_id, "r", {"a": 1}, {}) as run,
    ):
        unwritable(Path(mlflow.get_experiment(exp_id).artifact_location.removeprefix("file://")))
        run.log_files([weights])
    got = MlflowClient(store).get_run(run.id)
    assert got.info.status == "FAILED"
    reason = got.data.tags["sketchsweep.error"]
    assert reason.startswith("TrackingError: MLflow could not store model_weights.pth") and "PermissionError" in reason
    [line] = ours(caplog, logging.ERROR)
    assert f"MLflow run {run.id} failed: TrackingError: MLflow could not store model_weights.pth" in line
    assert "error.txt" in line


def test_an_existing_experiments_own_artifact_location_is_named(tmp_path, store, caplog):
    first, second = tmp_path / "first", tmp_path / "second"
    exp_id = tracking.setup_experiment(store, "x", str(first))
    assert not ours(caplog, logging.WARNING)
    assert tracking.setup_experiment(store, "x", str(second)) == exp_id
    [warning] = ours(caplog, logging.WARNING)
    assert f"experiment 'x' keeps its artifacts in {(first / 'x').as_uri()}" in warning
    assert f"not under mlflow.artifact_root={second}" in warning
    assert tracking.setup_experiment(store, "x", None) == exp_id  # not configured: nothing to say
    assert len(ours(caplog, logging.WARNING)) == 1
