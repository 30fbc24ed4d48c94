"""Sweeps whose trials run in other processes, two at a time: hydra-submitit-launcher's
``submitit_local`` (each trial its own job, a freed slot refilled at once) and
hydra-joblib-launcher (a batch at a time). Pruning, the study's counts, the MLflow parent and its
children hold as with the basic launcher; storages that cannot take parallel jobs are refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sketchsweep.cli import UserError
from sketchsweep.sweep.link import RUN_DIR_ATTR, TrialLink
from sketchsweep.sweep.storage import check_parallel, open_storage
from sketchsweep.sweep.study import Retry
from sketchsweep.train import train
from tests.conftest import cli_env, compose_config, tiny_overrides, train_cli
from tests.test_sweep import load, runs, sweep_args

LAUNCHERS = {
    "submitit_local": ["hydra/launcher=submitit_local"],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}


def _sweep(tiny_data, tmp_path, launcher: str, *extra: str):
    args = [a for a in sweep_args(tiny_data, tmp_path, "hydra.sweeper.n_jobs=2", *LAUNCHERS[launcher], *extra)]
    if any(a.startswith("trainer.epochs=choice") for a in extra):
        args.remove("trainer.epochs=4")  # the searched one
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_trials_at_a_time_are_pruned_counted_and_nested(tiny_data, tmp_path, launcher):
    _sweep(
        tiny_data,
        tmp_path,
        launcher,
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.pruner_kwargs={n_startup_trials:2,n_warmup_steps:0}",
        "optimizer.lr=choice(0.01,0.005,0.003,1e-7,1e-8,1e-9)",
    )
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    assert len(states) == 6 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(max(t.intermediate_values) < 4 for t in pruned)  # pruned in its job, epoch by epoch
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.metrics["study_best_val_acc"] == study.best_value
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == list(range(6))  # one run per trial
    assert all(
        c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children
    )
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert all(by_trial[t.number].data.tags["optuna.state"] == "PRUNED" for t in pruned)


def _spans(tmp_path) -> dict[int, tuple[int, int]]:
    """Each trial's MLflow run: (start, end) in ms."""
    _, _, children = runs(tmp_path)
    assert all(c.info.status == "FINISHED" for c in children)
    return {int(c.data.tags["optuna.trial"]): (c.info.start_time, c.info.end_time) for c in children}


# A long trial outlasts a job's start (5-7 s on 2 cores) only with many epochs (~0.3 s each); a batch
# shows its idle slot with few.
LONG = {"submitit_local": 60, "joblib": 16}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_slot_freed_early_is_refilled_at_once_by_submitit_only(tiny_data, tmp_path, launcher):
    """Trial 0 trains many epochs, trial 1 one: submitit starts trial 2 as trial 1 ends, while trial
    0 still trains; a joblib batch starts it only once trial 0 is done too (hydra issue #1954)."""
    _sweep(
        tiny_data,
        tmp_path,
        launcher,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.pruner=none",
        f"trainer.epochs=choice(1,{LONG[launcher]})",
    )
    epochs = [t.params["trainer.epochs"] for t in load(tmp_path).trials]
    assert epochs[:2] == [LONG[launcher], 1], epochs  # the random sampler's draws from seed 0 (Optuna 5)
    spans = _spans(tmp_path)
    assert spans[1][0] < spans[0][1]  # two at a time
    if launcher == "submitit_local":
        assert spans[1][1] <= spans[2][0] < spans[0][1]
    else:
        assert spans[2][0] >= spans[0][1]


@pytest.mark.slow
def test_sqlite_takes_the_basic_launchers_batches_and_a_path_is_not_a_url(tiny_data, tmp_path, monkeypatch):
    """The basic launcher runs a batch one job after another: SQLite is fine with n_jobs=2 there.
    A journal whose (relative) path starts with "sqlite" is a journal."""
    monkeypatch.chdir(tmp_path)
    check_parallel("sqlite-studies/s.journal", 2, remote=True)
    args = sweep_args(
        tiny_data, tmp_path, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", "model.width=choice(4,8)",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
    )  # fmt: skip
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("launcher", "storage", "error"),
    [
        (["hydra/launcher=joblib"], "sqlite:///{tmp}/optuna.db", "SQLite is not safe for hydra.sweeper.n_jobs=2"),
        (["hydra/launcher=slurm", "hydra.sweeper.n_jobs=1"], "sqlite:///{tmp}/optuna.db", "not safe for jobs on other"),
        # Jobs on other nodes would each see their own (empty) /dev/shm.
        (["hydra/launcher=slurm"], "/dev/shm/{name}/study.journal", "is in memory (tmpfs) on this machine"),
    ],
    ids=["sqlite", "sqlite-on-slurm", "tmpfs-journal-on-slurm"],
)
def test_a_storage_that_cannot_take_parallel_trials_is_refused(tiny_data, tmp_path, launcher, storage, error):
    if "hydra/launcher=slurm" in launcher and shutil.which("srun") is None:
        pytest.skip("no srun on PATH: submitit's SLURM executor cannot be built (make test installs slurm-wlm as root)")
    spec = storage.format(tmp=tmp_path, name=tmp_path.name)
    args = sweep_args(
        tiny_data, tmp_path, "hydra.sweeper.n_jobs=2", *launcher, "model.width=choice(4,8)",
        f"hydra.sweeper.storage={spec}",
    )  # fmt: skip
    proc = train_cli(args, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert error in out and "Traceback" not in out
    assert not (tmp_path / "optuna.db").exists() and not Path(spec).parent.exists()  # refused before it was opened
    assert not (tmp_path / "sweep").exists()


def test_the_slurm_launcher_without_slurm_commands_is_one_line(tiny_data, tmp_path):
    """Where no ``srun`` is on PATH (not a SLURM machine), submitit cannot build its executor: one
    line and exit 2, not a traceback."""
    args = sweep_args(tiny_data, tmp_path, "hydra/launcher=slurm", "model.width=choice(4,8)")
    env = cli_env() | {"PATH": str(tmp_path)}  # the venv's python is called by its full path
    proc = train_cli(args, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "hydra/launcher=slurm" in out and "srun" in out and "Traceback" not in out


@pytest.mark.slow  # needs the SLURM cluster (~20 s to start)
def test_a_job_slurm_refuses_is_one_line_naming_the_launcher(tiny_data, tmp_path, slurm):
    """sbatch refuses the first trial's job (a partition the cluster does not have): one line, exit 2."""
    args = sweep_args(
        tiny_data, tmp_path, "hydra/launcher=slurm", "hydra.launcher.partition=no-such-partition",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null",
        "model.width=choice(4,8)",
    )  # fmt: skip
    env = {**cli_env(), **slurm.env}
    proc = subprocess.run(
        [sys.executable, "-m", "sketchsweep.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    [line] = [x for x in out.splitlines() if "could not be submitted" in x]
    assert "hydra.launcher: trial 0" in line and "partition" in line.lower()
    assert "Traceback" not in out
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL]
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "FAILED" and not children


# -- a job's side: which trial it trains, and from where ------------------------------------------


def _trial_config(tiny_data, tmp_path, storage: str, number: int):
    args = tiny_overrides(tiny_data, f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", tmp_path / "run")
    sweep = [
        "sweep.study_name=s",
        f"sweep.storage={storage}",
        f"sweep.trial_number={number}",
        "sweep.objectives=[val_acc]",
    ]
    return compose_config([*args, *sweep])


def test_a_job_for_a_trial_its_sweep_gave_up_trains_nothing(tiny_data, tmp_path, caplog):
    """A job that starts after its sweep told its trial FAIL (the sweep stopped; SLURM requeued a
    preempted job whose trial was re-queued as a new one): one line in its log, no MLflow run, no
    folder."""
    storage = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(storage))
    study.tell(study.ask(), state=TrialState.FAIL)
    with pytest.raises(UserError, match=r"sweep.trial_number=0: trial 0 of study s is FAIL, expected RUNNING"):
        train(_trial_config(tiny_data, tmp_path, storage, 0), tmp_path / "run")
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "run").exists()
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # no sweep reads the job's return
    assert line.startswith("sweep.trial_number=0: trial 0 of study s is FAIL"), line


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_only_the_trial_that_recorded_a_folder_resumes_from_its_checkpoint(tmp_path):
    """A requeued job of trial 0 resumes from the checkpoint it left; trial 1, trial 0 re-queued
    as a new trial (its user attributes copied), starts over even in the same folder."""
    storage, run_dir = str(tmp_path / "study.journal"), tmp_path / "trial"
    study = optuna.create_study(study_name="s", storage=open_storage(storage))
    study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    TrialLink("s", storage, 0, "none", None).record_run("r0", "http://mlflow/r0", str(run_dir))
    (run_dir / "checkpoint.pt").parent.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"weights")
    assert TrialLink("s", storage, 0, "none", None).earlier_checkpoint(run_dir) == run_dir / "checkpoint.pt"
    study.tell(0, state=TrialState.FAIL)
    Retry(max_retry=1)(study, study.trials[0])
    assert study.ask().number == 1 and study.trials[1].user_attrs[RUN_DIR_ATTR] == str(run_dir)
    assert TrialLink("s", storage, 1, "none", None).earlier_checkpoint(run_dir) is None


def test_a_failed_job_is_named_by_its_error_line_and_log(tmp_path):
    """submitit's failure message is a page (a trace between rules, then log paths): the trial's
    failure says the exception line and where the job's log is."""
    import submitit

    from sketchsweep.sweep.jobs import outcome

    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    job = executor.submit(int, "not a number")
    job.wait()
    error = outcome(job)
    assert isinstance(error, RuntimeError) and "ended" in str(error), error
    assert "ValueError: invalid literal for int() with base 10: 'not a number'" in str(error)
    assert f"(log: {job.paths.stderr})" in str(error) and "\n" not in str(error)


def _sigterm_self_then_sleep(stop_on_sigterm: bool) -> str:
    """In a submitit job: SIGTERM itself (as scancel does) and report whether it was stopped."""
    import os
    import signal
    import time

    from sketchsweep import cli

    if stop_on_sigterm:
        cli.stop_on_sigterm_in_a_job()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
    return "went on"


@pytest.mark.parametrize("stop", [True, False], ids=["trial-job", "submitits-default"])
def test_a_trials_job_stops_on_sigterm_from_its_first_line(tmp_path, stop):
    """submitit's jobs ignore SIGTERM (its ``bypass``); a trial's job (``train.main``) undoes that
    first, so scancel or a stopped sweep ends it while it sets up, before training holds signals."""
    import submitit

    job = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local").submit(_sigterm_self_then_sleep, stop)
    job.wait()
    if stop:  # KeyboardInterrupt: the job ends with no result, as a cancelled one does
        assert not job.paths.result_pickle.exists() and "KeyboardInterrupt" in job.stderr()
    else:
        assert job.result() == "went on"
