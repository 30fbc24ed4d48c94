"""Job states from ``squeue`` for submitit, on a SLURM cluster without accounting (no slurmdbd,
so ``sacct`` fails). submitit reads states only from ``sacct``; without them it sees a job end
only by its result file, so a job cancelled, preempted or killed with no result would be waited
on forever. Imported only with a SLURM launcher (submitit is the ``slurm`` extra)."""

from __future__ import annotations

import os
import subprocess

from submitit.slurm import slurm

# squeue's transient states under the names sacct gives them: submitit takes any state outside
# its list of unfinished ones (PENDING, RUNNING, REQUEUED, COMPLETING, ...) as finished.
AS_SACCT = {
    "CONFIGURING": "PENDING",
    "REQUEUE_HOLD": "REQUEUED",
    "REQUEUE_FED": "REQUEUED",
    "RESIZING": "RUNNING",
    "SIGNALING": "COMPLETING",
    "STAGE_OUT": "COMPLETING",
    "SUSPENDED": "RUNNING",
    "STOPPED": "RUNNING",
}
GONE = "GONE"  # no longer listed (it ended more than MinJobAge ago): ended, how is unknown
POLL_S = 30  # the most seconds between two squeue calls (submitit's sacct default is 600)


class SqueueInfoWatcher(slurm.SlurmInfoWatcher):
    def _make_command(self) -> list[str] | None:
        if not (self._registered - self._finished):
            return None
        # Not -j: squeue fails when none of the ids it is given is known any more.
        # --all: jobs in hidden partitions too (else they would look gone at once).
        return ["squeue", "--all", "--noheader", "--states=all", f"--user={os.getuid()}", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        rows = []
        for line in text.splitlines():
            if line.strip():
                job_id, state, nodes = [*line.split("|"), "", ""][:3]
                rows.append(f"{job_id}|{AS_SACCT.get(state, state)}|{nodes}")
        info = super().read_info("\n".join(["JobID|State|NodeList", *rows]))
        for job_id in self._registered - self._finished:
            info.setdefault(job_id, {"JobID": job_id, "State": GONE, "NodeList": ""})
        return info


def has_accounting() -> bool:
    try:
        return subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def watch_with_squeue() -> None:
    """Let submitit read job states from squeue where sacct cannot give them."""
    if not isinstance(slurm.SlurmJob.watcher, SqueueInfoWatcher) and not has_accounting():
        slurm.SlurmJob.watcher = SqueueInfoWatcher(delay_s=POLL_S)
