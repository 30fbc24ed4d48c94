"""A journal study has one sweep process at a time (its owner lock); a SIGTERMed sweep leaves nothing
RUNNING whenever the signal lands; a SIGKILLed one resumes without repeating parameters or leaving
its trial's MLflow run RUNNING."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sketchsweep.sweep.settings import sampler_seed
from sketchsweep.sweep.storage import StudyBusy, journal_owner, owner_path
from tests.conftest import start_train, sweep_overrides, train_cli
from tests.test_sweep import load, runs, sweep_args

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_sweep_on_a_study_another_sweep_owns_exits_at_once(tiny_data, tmp_path):
    """The lock is held here, as a running sweep holds it: the command is refused with one line
    naming the study, the lock, its owner and the way to run several workers; the study is not touched."""
    journal = tmp_path / "study.journal"
    with journal_owner(str(journal), "test") as lock:
        proc = train_cli(
            sweep_args(tiny_data, tmp_path, "hydra.sweeper.n_trials=2", "model.width=choice(4,8)"), tmp_path
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    [line] = [x for x in out.splitlines() if str(lock) in x]
    assert "study test" in line and f"pid {os.getpid()} on this host" in line, line
    assert "database" in line and "postgresql" in line, line
    assert "Traceback" not in out
    assert not journal.exists()  # refused before the study was opened
    assert lock == owner_path(str(journal), "test") and lock.read_text() == ""  # released


def test_the_owner_lock_names_another_host_and_is_taken_over_from_a_dead_sweep(tmp_path, caplog):
    journal = str(tmp_path / "study.journal")
    with journal_owner(journal, "test") as lock:
        assert json.loads(lock.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
        lock.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242}))  # as a sweep on another machine writes it
        busy = r"pid 4242 on host gpu-node-7 holds .*study\.journal\.test\.owner"
        with pytest.raises(StudyBusy, match=busy), journal_owner(journal, "test"):
            pass
    assert lock.read_text() == ""
    # A sweep that was killed leaves its name in the file but holds no lock: the next one takes over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with caplog.at_level(logging.WARNING, logger="sketchsweep.sweeper"), journal_owner(journal, "test"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    [record] = [r for r in caplog.records if "taking over" in r.getMessage()]
    assert f"pid {int(dead.stdout)} on this host" in record.getMessage()
    # Another study in the same journal has its own owner.
    with journal_owner(journal, "other"), journal_owner(journal, "test"):
        pass


@pytest.mark.slow
def test_two_identical_sweeps_at_once_the_second_is_refused(tiny_data, tmp_path):
    args = sweep_args(
        tiny_data, tmp_path, "hydra.sweeper.n_trials=50", "hydra.sweeper.pruner=none", "model.width=choice(4,8)"
    )
    with open(tmp_path / "first.log", "w") as log:
        first = start_train(args, tmp_path, stdout=log, stderr=log, text=False)
    try:
        while not (
            (tmp_path / "study.journal").exists() and any(t.state == TrialState.RUNNING for t in load(tmp_path).trials)
        ):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        second = train_cli(args, cwd=tmp_path)
        out = second.stdout + second.stderr
        assert second.returncode == 2, out[-3000:]
        assert f"pid {first.pid} on this host" in out and "study test" in out and "Traceback" not in out
        assert TrialState.FAIL not in [t.state for t in load(tmp_path).trials]  # the first's trial left alone
    finally:
        first.send_signal(signal.SIGTERM)  # lands anywhere: in a trial's training, its setup, between trials
        first.wait(timeout=120)
    assert first.returncode == 130, (tmp_path / "first.log").read_text()[-3000:]
    trials = load(tmp_path).trials
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE}
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "KILLED" and "RUNNING" not in [c.info.status for c in children]
    assert complete == {int(c.data.tags["optuna.trial"]) for c in children if c.info.status == "FINISHED"}
    by_trial = Counter(int(c.data.tags["optuna.trial"]) for c in children)
    assert set(by_trial.values()) == {1}  # one run per trial: none repeated by a second sweep
    # A trial has no run only when the signal cut it before its training began (then it is FAIL).
    assert [t.state for t in trials if t.number not in by_trial] in ([], [TrialState.FAIL]), trials


def _study_set_up(tmp_path) -> bool:
    return (tmp_path / "study.journal").exists()


def _trial_0_set_up(tmp_path) -> bool:
    return (tmp_path / "sweep" / "trial-0").exists()  # Hydra made its folder: it has not trained yet


def _trial_0_told(tmp_path) -> bool:
    if not _study_set_up(tmp_path):
        return False  # (loading would create the journal)
    try:
        return any(t.state == TrialState.COMPLETE for t in load(tmp_path).trials)
    except KeyError:  # the journal exists, the study in it not yet
        return False


def _sigterm_when(moment, args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Run the sweep, send it SIGTERM as soon as ``moment(tmp_path)`` holds; its exit and output."""
    with open(tmp_path / "sweep.log", "w") as log:
        proc = start_train(args, tmp_path, stdout=log, stderr=log, text=False)
    try:
        while not moment(tmp_path):
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, (tmp_path / "sweep.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("moment", [_study_set_up, _trial_0_set_up, _trial_0_told], ids=lambda f: f.__name__[1:])
def test_a_sigterm_at_any_moment_ends_the_sweep_killed_with_nothing_left_running(tiny_data, tmp_path, moment):
    """Outside a trial's training too (the study or a trial being set up, between trials), SIGTERM
    stops the sweep as Ctrl-C does: exit 130, the parent run KILLED, no trial RUNNING in Optuna or MLflow."""
    args = sweep_args(
        tiny_data, tmp_path, "hydra.sweeper.n_trials=20", "hydra.sweeper.pruner=none", "model.width=choice(4,8)"
    )
    proc, out = _sigterm_when(moment, args, tmp_path)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "run the same command to continue" in out.splitlines()[-1], out[-3000:]
    trials = load(tmp_path).trials
    assert TrialState.RUNNING not in [t.state for t in trials], [(t.number, t.state) for t in trials]
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert not [c.info.run_name for c in children if c.info.status == "RUNNING"]
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE}
    assert complete == {int(c.data.tags["optuna.trial"]) for c in children if c.info.status == "FINISHED"}


@pytest.mark.slow
def test_a_sigterm_once_the_last_trial_is_recorded_changes_nothing(tiny_data, tmp_path):
    args = sweep_args(tiny_data, tmp_path, "hydra.sweeper.n_trials=1", "model.width=choice(4,8)")
    proc, out = _sigterm_when(_trial_0_told, args, tmp_path)
    assert proc.returncode == 0, out[-3000:]
    assert "trainer.resume" not in out and "run the same command" not in out
    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE]
    _, [parent], [child] = runs(tmp_path)
    assert (parent.info.status, child.info.status) == ("FINISHED", "FINISHED")


def _kill_during(proc: subprocess.Popen, trial: int, tmp_path: Path) -> list[str]:
    """SIGKILL the sweep (its whole session) as soon as trial ``trial`` has reported its first epoch."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # the sweep's line as the trial starts
        lines.append(line)
        if f"] trial {trial}: " in line:
            break
    deadline = time.monotonic() + 120
    while not load(tmp_path).trials[trial].intermediate_values:
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return lines


@pytest.mark.slow
def test_a_sigkilled_sweep_resumes_without_repeats_or_orphan_runs(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = sweep_overrides(
        tiny_data,
        str(tmp_path / "study.journal"),
        uri,
        tmp_path / "sweep",
        "test",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=none",
        # TPE (the default) samples its first trials at random from its seed: a rerun with the seed
        # it started with draws trial 0's learning rate again.
        "optimizer.lr=tag(log,interval(1e-4,1e-2))",
        epochs=16,  # long enough that trial 1 is still training when it is killed
    )
    proc = start_train(args, tmp_path, start_new_session=True)
    lines = _kill_during(proc, trial=1, tmp_path=tmp_path)
    killed = load(tmp_path).trials
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING], "".join(lines)[-3000:]
    [run_1] = [c for c in runs(tmp_path)[2] if c.data.tags.get("optuna.trial") == "1"]
    assert run_1.info.status == "RUNNING"

    again = train_cli(args, cwd=tmp_path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "taking over" in out and f"pid {proc.pid} on this host" in out, out[-3000:]
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    # The rerun's sampler is not the killed sweep's again: it proposes nothing already trained.
    assert trials[2].params not in [t.params for t in killed], [t.params for t in trials]
    _, [parent], children = runs(tmp_path)
    assert parent.info.status == "FINISHED"
    by_trial = {c.data.tags["optuna.trial"]: c for c in children}
    assert sorted(by_trial) == ["0", "1", "2"] and len(children) == 3
    orphan = by_trial["1"]
    assert orphan.info.status == "KILLED" and orphan.data.tags["optuna.state"] == "FAIL"
    assert "killed" in orphan.data.tags["sketchsweep.stopped"]
    assert [by_trial[n].info.status for n in ("0", "2")] == ["FINISHED", "FINISHED"]


def test_sampler_seeds_differ_by_worker_and_progress_and_a_new_study_keeps_the_seed():
    assert [sampler_seed(7, k, 0) for k in range(3)] == [7, 8, 9]  # README: worker k of a new study: seed + k
    seeds = {sampler_seed(7, k, p) for k in range(8) for p in range(200)}
    assert len(seeds) == 8 * 200 and all(0 <= s < 2**32 for s in seeds)
    assert sampler_seed(None, 3, 5) is None
