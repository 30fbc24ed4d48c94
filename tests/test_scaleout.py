"""Scaling out on real servers: several sweep workers on one PostgreSQL study, an MLflow tracking
server with a PostgreSQL backend, dead workers and a server outage."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sketchsweep.cli import redact
from sketchsweep.sweep.storage import StorageError, open_storage
from sketchsweep.sweep.workers import parse
from sketchsweep.tracking import TrackingError, setup_experiment
from tests.conftest import cli_env, free_port, sweep_overrides, tiny_overrides, train_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def sweep_args(tiny_data, tmp_path: Path, storage: str, uri: str, experiment: str, *extra: str) -> list[str]:
    return sweep_overrides(
        tiny_data,
        storage,
        uri,
        tmp_path / "sweep",
        "shared",
        f"mlflow.experiment_name={experiment}",
        "hydra.sweeper.pruner=none",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=4",
        "optimizer.lr=tag(log,interval(1e-4,1e-2))",
        *extra,
        epochs=2,
    )


def experiment_runs(uri: str, experiment: str):
    """(client, the sweep's parent runs, the trial runs) in one experiment of the server."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sketchsweep.role") == "sweep"]
    return client, parents, [r for r in runs if r not in parents]


def test_two_workers_share_one_study_and_one_parent_run(tiny_data, tmp_path, pg_db, mlflow_server):
    args = sweep_args(tiny_data, tmp_path, pg_db, mlflow_server.uri, "two-workers", "hydra.sweeper.n_trials=8")
    proc = subprocess.run(
        [sys.executable, "-m", "sketchsweep.workers", "--workers", "2", "--", *args],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    # Both workers trained trials (each trial's job logs where its MLflow run went).
    for worker in ("[worker 0]", "[worker 1]"):
        assert any(line.startswith(worker) and "MLflow run" in line for line in proc.stdout.splitlines()), worker

    trials = optuna.load_study(study_name="shared", storage=open_storage(pg_db)).trials
    done = [t for t in trials if t.state in DONE]
    assert len(done) == 8, [(t.number, t.state.name) for t in trials]  # n_trials is the study's total
    assert len({t.params["optimizer.lr"] for t in done}) == 8  # each trial ran once, with its own params
    for t in trials:  # anything else is a trial asked after the total was reached, never trained
        assert t.state in DONE or "sketchsweep.surplus" in t.user_attrs, (t.number, t.state.name)

    _, [parent], children = experiment_runs(mlflow_server.uri, "two-workers")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "shared"
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {int(c.data.tags["optuna.trial"]) for c in children} == {t.number for t in done}
    # Job folders are named by trial number, so the workers' folders never collide.
    assert {p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()} == {f"trial-{t.number}" for t in done}


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_by_the_other(tiny_data, tmp_path, pg_db, mlflow_server):
    args = sweep_args(
        tiny_data, tmp_path, pg_db, mlflow_server.uri, "killed-worker", "hydra.sweeper.n_trials=4", "trainer.epochs=8"
    )
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sketchsweep.train", *args],
                    cwd=tmp_path,
                    env={**cli_env(), "SKETCHSWEEP_WORKER": str(i)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    victim, survivor = procs
    storage = open_storage(pg_db)
    deadline = time.monotonic() + 180
    killed = None
    while killed is None:  # worker 0's current trial, once it has reported an epoch
        assert victim.poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
        numbers = re.findall(r"\] trial (\d+): ", logs[0].read_text())  # the sweep says which trial starts
        if numbers:
            study = optuna.load_study(study_name="shared", storage=storage)
            t = study.trials[int(numbers[-1])]
            if t.state == TrialState.RUNNING and t.intermediate_values:
                victim.send_signal(signal.SIGKILL)
                killed = t
        time.sleep(0.05)
    victim.wait(timeout=30)
    assert survivor.wait(timeout=240) == 0, logs[1].read_text()[-4000:]

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert trials[killed.number].state == TrialState.FAIL
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    assert sum(t.state in DONE for t in trials) == 4  # the study still reaches its total

    client, [parent], children = experiment_runs(mlflow_server.uri, "killed-worker")
    lost = [c for c in children if c.data.tags["optuna.trial"] == str(killed.number)]
    assert [c.info.status for c in lost] == ["KILLED"]
    assert "worker lost" in lost[0].data.tags["sketchsweep.stopped"]
    assert lost[0].data.tags["optuna.state"] == "FAIL"
    assert sum(c.info.status == "FINISHED" for c in children) == 4
    assert parent.info.status == "FINISHED"
    assert not [r for r in client.search_runs([parent.info.experiment_id]) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_cleanly(tiny_data, tmp_path, pg_db, mlflow_server):
    args = sweep_args(
        tiny_data, tmp_path, pg_db, mlflow_server.uri, "ctrl-c", "hydra.sweeper.n_trials=20", "trainer.epochs=30"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sketchsweep.workers", "--workers", "2", "--", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    storage = open_storage(pg_db)
    deadline = time.monotonic() + 180
    while True:  # both workers are training
        assert proc.poll() is None and time.monotonic() < deadline
        try:
            trials = optuna.load_study(study_name="shared", storage=storage).trials
        except KeyError:  # not created yet
            trials = []
        if sum(t.state == TrialState.RUNNING and bool(t.intermediate_values) for t in trials) == 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    _, [parent], children = experiment_runs(mlflow_server.uri, "ctrl-c")
    assert not [c.info.run_name for c in children if c.info.status == "RUNNING"]
    assert sum(c.info.status == "KILLED" for c in children) == 2
    assert parent.info.status == "KILLED"


@pytest.mark.slow
def test_metrics_logged_while_the_tracking_server_is_down_are_sent_when_it_is_back(tiny_data, tmp_path, mlflow_server):
    run_dir = tmp_path / "run"
    epochs = 40
    overrides = tiny_overrides(tiny_data, mlflow_server.uri, run_dir, f"trainer.epochs={epochs}")
    overrides += ["mlflow.experiment_name=outage", "model.width=4", "model.hidden=16"]
    log = tmp_path / "train.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sketchsweep.train", *overrides],
            cwd=tmp_path,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def epoch() -> int:
        try:
            return torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
        except (FileNotFoundError, RuntimeError, EOFError):
            return 0

    def wait_for(cond, what: str) -> None:
        deadline = time.monotonic() + 120
        while not cond():
            assert proc.poll() is None and time.monotonic() < deadline, f"{what}: {log.read_text()[-3000:]}"
            time.sleep(0.05)

    try:
        wait_for(lambda: epoch() >= 2, "training did not start")
        mlflow_server.stop()
        stopped_at = epoch()
        wait_for(lambda: epoch() >= stopped_at + 3, "training stalled while the server was down")
    finally:
        mlflow_server.start()  # same port, same PostgreSQL: the other tests need it too
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]

    out = log.read_text()
    assert "cannot be reached: training goes on, metrics are buffered" in out
    assert "is back after" in out
    client, _, [run] = experiment_runs(mlflow_server.uri, "outage")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == list(range(1, epochs + 1))
    assert not (run_dir / "mlflow_unsent.json").exists()


def test_unreachable_servers_are_named_by_their_config_key(tiny_data, tmp_path):
    dead = free_port()
    storage = f"postgresql+psycopg://someone:secret@127.0.0.1:{dead}/optuna"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = train_cli(sweep_args(tiny_data, tmp_path, storage, store, "x", "hydra.sweeper.n_trials=1"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"hydra.sweeper.storage=postgresql+psycopg://someone:***@127.0.0.1:{dead}/optuna: cannot connect" in out
    assert "secret" not in out

    with pytest.raises(TrackingError, match=rf"mlflow\.tracking_uri=http://127\.0\.0\.1:{dead}: cannot reach"):
        setup_experiment(f"http://127.0.0.1:{dead}", "x", None)


def test_a_postgres_storage_without_psycopg_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what `import psycopg` sees when it is not installed
    with pytest.raises(StorageError, match=r"hydra\.sweeper\.storage=postgresql://u:\*\*\*@db/optuna: .*psycopg 3"):
        open_storage("postgresql://u:pw@db/optuna")
    assert redact("postgresql+psycopg://u:pw@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "0,x", "--", "-m", "hydra.sweeper.storage=postgresql://h/db"], "--gpus=0,x: expected distinct"),
        (["--workers", "2", "--", "-m", "optimizer.lr=0.1"], "hydra.sweeper.storage: expected a database URL"),
        (["--workers", "2", "--", "hydra.sweeper.storage=postgresql://h/db"], "expected a sweep after --"),
    ],
)
def test_workers_reject_bad_arguments_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_each_gpu_gets_one_pinned_worker():
    workers, args = parse(["--gpus", "0,2", "--", "-m", "hydra.sweeper.storage=postgresql://h/db"])
    assert workers == [("gpu 0", {"CUDA_VISIBLE_DEVICES": "0"}), ("gpu 2", {"CUDA_VISIBLE_DEVICES": "2"})]
    assert args == ["-m", "hydra.sweeper.storage=postgresql://h/db"]
