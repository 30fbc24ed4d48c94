"""Sweeps whose trials are SLURM jobs (``hydra/launcher=slurm``) on the throwaway cluster of
tests/slurm_cluster.py: two trials at a time, pruned, counted and nested as elsewhere; a trial
whose job is cancelled is re-run; a stopped sweep cancels its jobs; a requeued job resumes its
trial from its checkpoint. The cluster has no sacct: the sweep reads job states from squeue."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import cli_env, start_train, sweep_overrides, train_cli
from tests.slurm_cluster import SlurmCluster
from tests.test_slurm_cluster import ENDED, idle, until  # noqa: F401 (idle: a fixture)
from tests.test_sweep import load, runs

# The slurm preset asks for a GPU, 8 CPUs and 32 GB: the test node has 2 CPUs and no GPU.
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.timeout_min=60",  # >= 13: below, submitit takes its USR2 for a time limit
    "hydra.sweeper.n_jobs=2",
]
# Each test has the cluster to itself (``idle``: no job left from an earlier test, none left after).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle")]
JOB_LINE = re.compile(r"trial (\d+): job (\d+)$", re.M)
# Trials that are still training when the test acts on them (a job or the sweep), after their first epoch.
LONG = ["hydra.sweeper.pruner=none", "optimizer.lr=choice(0.01,0.005)"]
LONG_EPOCHS = 30  # 0.1-0.5 s each: seconds for the test to act after the first


def slurm_env(slurm: SlurmCluster) -> dict[str, str]:
    """The sweep's environment: the tests' (``cli_env``) with the cluster's SLURM settings, which
    submitit's sbatch, squeue and scancel and then the jobs inherit. One thread per job: the test
    cluster does not pin a job to its CPU (TaskPlugin=task/none), and two jobs of two threads each
    on two cores, beside a third process starting, make an epoch of 0.3 s take ten."""
    env = {k: v for k, v in cli_env().items() if k in slurm.env or k == "PYTHONUNBUFFERED"}
    return env | {"SLURM_CONF": slurm.env["SLURM_CONF"], "OMP_NUM_THREADS": "1"}


def slurm_sweep(tiny_data, tmp_path: Path, *extra: str, epochs: int = 4) -> list[str]:
    """An Optuna sweep of tiny trials as SLURM jobs, two at a time (tests.test_sweep's paths)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    journal = str(tmp_path / "study.journal")
    return sweep_overrides(tiny_data, journal, uri, tmp_path / "sweep", "test", *SLURM, *extra, epochs=epochs)


def job_ids(out: str) -> dict[int, str]:
    """Each trial's SLURM job, from the sweep's log (``trial 3: job 17``): the last one per trial."""
    return {int(trial): job for trial, job in JOB_LINE.findall(out)}


def ended(slurm: SlurmCluster, ids) -> list[dict[str, str]]:
    """The jobcomp log's records of the jobs ``ids`` (a requeued job has one per run)."""
    return [r for r in slurm.completed() if r["JobId"] in set(ids)]


def test_trials_run_as_slurm_jobs_two_at_a_time_pruned_counted_and_nested(slurm, tiny_data, tmp_path):
    args = slurm_sweep(
        tiny_data, tmp_path, "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler=grid",
        "hydra.sweeper.pruner_kwargs={n_startup_trials:2,n_warmup_steps:0}",
        "optimizer.lr=choice(1e-8,1e-9,0.01,0.005)",
    )  # fmt: skip
    proc = train_cli(args, cwd=tmp_path, env=slurm_env(slurm))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    assert len(states) == 4 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    # The grid's order from seed 0: the good rates first, so the hopeless ones are pruned. Trial 3
    # starts only once trials 0 and 1 are both done (n_startup_trials), so it is pruned for sure.
    assert [t.params["optimizer.lr"] for t in study.trials] == [0.01, 0.005, 1e-9, 1e-8]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert study.trials[3] in pruned and all(max(t.intermediate_values) < 4 for t in pruned), states
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.metrics["study_best_val_acc"] == study.best_value
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert sorted(by_trial) == [0, 1, 2, 3] and len(children) == 4  # one run per trial
    assert all(
        c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children
    )
    assert all(by_trial[t.number].data.tags["optuna.state"] == t.state.name for t in study.trials)
    # Each trial was its own SLURM job, run to its end, and recorded as such by the cluster.
    jobs = job_ids(out)
    assert sorted(jobs) == [0, 1, 2, 3] and len(set(jobs.values())) == 4, out[-3000:]
    for job in jobs.values():  # its result is back before SLURM has ended the job
        info = slurm.wait_state(job, ENDED)
        assert (info["JobState"], info["ExitCode"], info["JobName"], info["Partition"]) == (
            "COMPLETED", "0:0", "train", "debug"
        ), info  # fmt: skip
    logged = until(
        lambda: len(records := ended(slurm, jobs.values())) == 4 and records, "the 4 jobs in the jobcomp log"
    )
    assert [r["JobState"] for r in logged] == ["COMPLETED"] * 4, logged
    # Two at a time: trial 1's job started before trial 0's ended. (The jobs' spans, not the MLflow
    # runs': a run trains for half a second, less than two jobs' start-up may differ by.)
    by_id = {r["JobId"]: r for r in logged}
    assert by_id[jobs[1]]["StartTime"] < by_id[jobs[0]]["EndTime"], logged  # ISO times, to the second


@pytest.fixture
def start_sweep(slurm: SlurmCluster, tmp_path: Path) -> Iterator[Callable[[list[str]], subprocess.Popen]]:
    """Start a sweep in the background, its output in ``sweep.log``; one a test leaves running is
    killed (then ``idle`` cancels its jobs)."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        with open(tmp_path / "sweep.log", "w") as log:
            procs.append(start_train(args, tmp_path, stdout=log, stderr=log, text=False, env=slurm_env(slurm)))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sweep_log(tmp_path: Path) -> str:
    return (tmp_path / "sweep.log").read_text()


def training(slurm: SlurmCluster, proc: subprocess.Popen, tmp_path: Path, trial: int) -> str:
    """Trial ``trial``'s job, once it is RUNNING in squeue and the trial has reported an epoch
    (so it has its MLflow run and a checkpoint)."""

    def ready() -> str | None:
        assert proc.poll() is None, sweep_log(tmp_path)[-3000:]
        job = job_ids(sweep_log(tmp_path)).get(trial)
        if job is None or {"id": job, "state": "RUNNING", "name": "train"} not in slurm.squeue():
            return None
        trials = load(tmp_path).trials
        return job if len(trials) > trial and trials[trial].intermediate_values else None

    return until(ready, f"trial {trial}'s job RUNNING with an epoch reported", timeout=180)


def ended_sweep(proc: subprocess.Popen, tmp_path: Path) -> str:
    """The sweep's output once it has ended."""
    proc.wait(timeout=300)
    return sweep_log(tmp_path)


def test_a_trial_whose_job_is_cancelled_is_failed_and_run_again(slurm, start_sweep, tiny_data, tmp_path):
    """``scancel`` of a trial's job: the trial is FAIL, its MLflow run KILLED saying why, and a copy
    with the same params (hydra.sweeper.max_retry=1) completes; the sweep ends with n_trials done.
    A lost trial re-queued is no failure of its own: max_failures=0 does not stop the sweep."""
    args = slurm_sweep(
        tiny_data, tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failures=0", *LONG, epochs=LONG_EPOCHS
    )
    proc = start_sweep(args)
    job = training(slurm, proc, tmp_path, trial=0)
    slurm.run("scancel", job)
    out = ended_sweep(proc, tmp_path)
    assert proc.returncode == 0, out[-3000:]
    assert slurm.job(job)["JobState"] == "CANCELLED"
    assert "scancel: error" not in out  # the lost job is cancelled again (quietly), in case SLURM would rerun it
    assert f"trial 0: its job {job} ended CANCELLED with no result: optuna FAIL, re-queued with the same params" in out
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], out[-3000:]
    [copy] = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert copy.number == 2 and copy.params == trials[0].params and copy.system_attrs["retry_history"] == [0]
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "FINISHED"
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert sorted(by_trial) == [0, 1, 2] and len(children) == 3
    cancelled = by_trial[0]
    assert (cancelled.info.status, cancelled.data.tags["optuna.state"]) == ("KILLED", "FAIL")
    assert f"its job {job} ended CANCELLED" in cancelled.data.tags["sketchsweep.stopped"]
    assert [by_trial[n].info.status for n in (1, 2)] == ["FINISHED", "FINISHED"]


def test_a_stopped_sweep_cancels_its_jobs_and_the_same_command_continues(slurm, start_sweep, tiny_data, tmp_path):
    """SIGTERM to the sweep while two jobs train: it cancels them and waits for them to end (exit
    130), nothing is left RUNNING in SLURM, Optuna or MLflow; the same command finishes the study."""
    args = slurm_sweep(tiny_data, tmp_path, "hydra.sweeper.n_trials=2", *LONG, epochs=LONG_EPOCHS)
    proc = start_sweep(args)
    jobs = [training(slurm, proc, tmp_path, trial) for trial in (0, 1)]
    proc.send_signal(signal.SIGTERM)
    out = ended_sweep(proc, tmp_path)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "run the same command to continue" in out.splitlines()[-1], out[-3000:]
    assert not [j for j in slurm.squeue() if j["id"] in jobs]  # cancelled, and ended within the grace period
    assert [slurm.job(j)["JobState"] for j in jobs] == ["CANCELLED", "CANCELLED"]
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL, TrialState.FAIL]
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert sorted((c.data.tags["optuna.trial"], c.info.status) for c in children) == [("0", "KILLED"), ("1", "KILLED")]
    assert all(c.data.tags["optuna.state"] == "FAIL" for c in children)
    assert all("its sweep was stopped while it ran" in c.data.tags["sketchsweep.stopped"] for c in children)

    again = train_cli(args, cwd=tmp_path, timeout=300, env=slurm_env(slurm))
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    states = [t.state for t in load(tmp_path).trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], out[-3000:]
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "FINISHED" and "RUNNING" not in [c.info.status for c in children]


def test_a_requeued_job_resumes_its_trial_from_its_checkpoint(slurm, start_sweep, tiny_data, tmp_path):
    """``scontrol requeue`` (preemption with requeue): the job runs again under the same id, finds
    its trial still RUNNING with its folder's checkpoint, and goes on from there."""
    args = slurm_sweep(tiny_data, tmp_path, "hydra.sweeper.n_trials=1", *LONG, epochs=LONG_EPOCHS)
    proc = start_sweep(args)
    job = training(slurm, proc, tmp_path, trial=0)
    slurm.run("scontrol", "requeue", job)
    out = ended_sweep(proc, tmp_path)
    assert proc.returncode == 0, out[-3000:]
    info = slurm.wait_state(job, ENDED)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), info
    [trial] = load(tmp_path).trials
    assert trial.state == TrialState.COMPLETE and sorted(trial.intermediate_values) == list(range(1, LONG_EPOCHS + 1))
    log = (tmp_path / "sweep" / "trial-0" / "train.log").read_text()
    assert "trial 0 runs again (its job was requeued): resuming from" in log, log[-3000:]
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "FINISHED"
    first, second = sorted(children, key=lambda c: c.info.start_time)
    assert first.info.status == "KILLED" and second.info.status == "FINISHED"
    assert second.data.tags["sketchsweep.resumed_from_run"] == first.info.run_id
    assert int(second.data.tags["sketchsweep.resumed_at_epoch"]) >= 1


def test_a_job_the_cluster_cancelled_is_lost_at_once(slurm, tmp_path, monkeypatch):
    """A job SLURM ended with no result (scancel, preemption) is ``JobLost`` as soon as squeue says
    so. submitit's ``results()`` would first wait for a result file (15 s, for slow shared file
    systems), and the sweep with it: no finished trial collected, no slot refilled meanwhile."""
    import submitit
    from submitit.slurm.slurm import SlurmJob

    from sketchsweep.sweep.jobs import JobLost, outcome
    from sketchsweep.sweep.squeue import SqueueInfoWatcher

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setattr(SlurmJob, "watcher", SqueueInfoWatcher(delay_s=1))  # as the sweep sets it: no sacct here
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(slurm_partition="debug", cpus_per_task=1, timeout_min=60)
    job = executor.submit(time.sleep, 300)
    slurm.wait_state(job.job_id, {"RUNNING"})
    slurm.run("scancel", job.job_id)
    until(lambda: job.done(force_check=True), "submitit to see the job ended")
    job._results_timeout_s = 3600  # submitit's wait for a result file: were it waited for, the deadline fails
    found: list[object] = []
    threading.Thread(target=lambda: found.append(outcome(job)), daemon=True).start()
    until(lambda: found, "the job's outcome")
    assert isinstance(found[0], JobLost) and f"its job {job.job_id} ended CANCELLED" in str(found[0]), found
