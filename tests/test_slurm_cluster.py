"""The throwaway SLURM cluster the sweep tests run on (tests/slurm_cluster.py): real munged,
slurmctld and slurmd; jobs run with sbatch and srun and are seen in squeue, scontrol and the
jobcomp log (there is no sacct)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT
from tests.slurm_cluster import SlurmCluster, SlurmError

# Starting the cluster and its jobs takes ~30 s: slow, as every test that needs it (CI runs them).
pytestmark = pytest.mark.slow
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something true; fail with ``what`` after ``timeout`` (a
    deadline for a loaded machine, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.2)
    return result


def sbatch(slurm: SlurmCluster, cwd: Path, *args: str) -> str:
    """Submit a batch job from ``cwd``; its id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=slurm.env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def logged(slurm: SlurmCluster, jobid: str) -> dict[str, str] | None:
    return next((job for job in slurm.completed() if job["JobId"] == jobid), None)


@pytest.fixture
def idle(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster with no job left by an earlier test; cancels what a test leaves."""
    until(lambda: not slurm.squeue(), "the queue to be empty")
    yield slurm
    ids = [job["id"] for job in slurm.squeue()]
    if ids:
        slurm.run("scancel", *ids)
        until(lambda: not slurm.squeue(), "the left jobs to end")


def test_sinfo_shows_one_idle_node_with_two_cpus_in_debug(idle):
    until(lambda: idle.node_state() == "idle", "the node to be idle")
    out = idle.run("sinfo", "-h", "-N", "-o", "%N|%c|%P|%T").stdout.split()
    assert out == [f"{socket.gethostname().split('.')[0]}|2|debug*|idle"]


def test_srun_runs_on_this_host(idle, tmp_path):
    out = subprocess.run(["srun", "hostname"], cwd=tmp_path, env=idle.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == socket.gethostname()


def test_sbatch_runs_a_script_and_its_end_is_recorded(idle, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/bash\necho "job $SLURM_JOB_ID in $SLURM_JOB_PARTITION"\n')
    jobid = sbatch(idle, tmp_path, "-J", "hello", "-o", str(tmp_path / "out-%j.txt"), str(script))

    job = idle.wait_state(jobid, ENDED)
    assert (job["JobState"], job["ExitCode"], job["JobName"]) == ("COMPLETED", "0:0", "hello")
    assert (tmp_path / f"out-{jobid}.txt").read_text() == f"job {jobid} in debug\n"
    record = until(lambda: logged(idle, jobid), "the job in the jobcomp log")
    assert (record["JobState"], record["Name"], record["ExitCode"]) == ("COMPLETED", "hello", "0:0")
    assert {"id": jobid, "state": "COMPLETED", "name": "hello"} in idle.squeue(all_states=True)


def test_two_one_cpu_jobs_run_at_once(idle, tmp_path):
    ids = {sbatch(idle, tmp_path, "-c", "1", "-J", f"sleep{i}", "--wrap", "sleep 300") for i in (1, 2)}

    def running() -> bool:
        return {job["id"] for job in idle.squeue() if job["state"] == "RUNNING"} == ids

    until(running, "both jobs RUNNING together")
    assert idle.node_state() == "allocated"


def test_scancel_ends_a_running_job(idle, tmp_path):
    jobid = sbatch(idle, tmp_path, "-J", "victim", "--wrap", "sleep 300")
    idle.wait_state(jobid, {"RUNNING"})

    idle.run("scancel", jobid)

    assert idle.wait_state(jobid, ENDED)["JobState"] == "CANCELLED"
    assert until(lambda: logged(idle, jobid), "the job in the jobcomp log")["JobState"] == "CANCELLED"
    assert not idle.squeue()


def test_a_requeued_job_runs_again_soon(idle, tmp_path):
    """``scontrol requeue`` (what submitit does on preemption): the job is killed and runs again
    under the same id once it is eligible (cred_expire, 10 s here, not SLURM's 120 s)."""
    runs = tmp_path / "runs.txt"
    script = f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {runs}; [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] && sleep 300; true'
    jobid = sbatch(idle, tmp_path, "-J", "again", "--wrap", script)
    idle.wait_state(jobid, {"RUNNING"})

    idle.run("scontrol", "requeue", jobid)

    job = idle.wait_state(jobid, ENDED, timeout=90)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1")
    assert runs.read_text() == "0\n1\n"
    records = until(lambda: [r for r in idle.completed() if r["JobId"] == jobid][1:], "the second run in the log")
    assert records[-1]["JobState"] == "COMPLETED"


def test_a_daemon_that_cannot_start_is_reported_with_its_log(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root")
    # Longer than a unix socket's path may be: munged cannot create its socket and exits.
    folder = tmp_path / ("x" * 100)
    folder.mkdir()
    cluster = SlurmCluster(folder)
    with pytest.raises(SlurmError, match=r"munged exited\n--- munged(.|\n)*socket pathname") as err:
        cluster.start()
    assert str(folder) in str(err.value)
    assert not cluster.procs


def test_by_hand_the_module_starts_a_cluster_until_ctrl_c(slurm, tmp_path):
    """``python -m tests.slurm_cluster FOLDER`` as the docstring tells a user (beside the session's
    own cluster: its own ports and files)."""
    folder = tmp_path / "by-hand"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.slurm_cluster", str(folder)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("SLURM cluster up")
        assert proc.stdout.readline().strip() == f"export SLURM_CONF={folder / 'slurm.conf'}"
        env = {**slurm.env, "SLURM_CONF": str(folder / "slurm.conf")}
        out = subprocess.run(["srun", "hostname"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == socket.gethostname(), out.stderr
        daemons = [int((folder / f"{name}.pid").read_text()) for name in ("munged", "slurmctld", "slurmd")]
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    assert rc == 0, proc.stdout.read()
    assert not [pid for pid in daemons if Path(f"/proc/{pid}").exists()]
