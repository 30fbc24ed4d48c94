"""A throwaway single-node SLURM cluster in one folder, for tests (and by hand).

Debian's ``slurm-wlm`` and ``munge`` packages (``make test`` installs them as root). Everything the
cluster writes lives in the folder: its own munge key and socket, a ``slurm.conf`` (one node, this
host's short name on 127.0.0.1 with 2 CPUs, partition ``debug``, free TCP ports so a system SLURM
is untouched), state, spool, pid and log files, and a ``jobcomp/filetxt`` log of finished jobs
(there is no slurmdbd, so no ``sacct``: see jobs with ``squeue``/``scontrol show job``). Needs root.

Reproduce the tests' cluster by hand, as root, from the repository root (without FOLDER: a new
temp folder)::

    .venv/bin/python -m tests.slurm_cluster /tmp/slurm        # prints `export SLURM_CONF=...`
    export SLURM_CONF=/tmp/slurm/slurm.conf                   # in another shell
    sinfo; srun hostname; sbatch --wrap 'sleep 5'; squeue; scontrol show job 1

Ctrl-C (or SIGTERM) stops it, cancelling the jobs left; the folder stays, with the daemons' logs."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "squeue", "scontrol", "sbatch", "srun", "scancel")
START_TIMEOUT = 90.0  # seconds for the node to come up idle: generous for a loaded 2-core machine
# Why some settings: CR_CPU lets two 1-CPU jobs share the node; config_overrides keeps CPUs=2 on a
# 1-core machine; KillWait=5 makes scancel quick; MinJobAge keeps ended jobs in scontrol for 10 min;
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again, and
# sched_interval (default 60 s) how long it then may wait for the scheduler.
CONF = """\
ClusterName=sketchsweep
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
PlugStackConfig={dir}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
SchedulerParameters=sched_interval=2
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=500 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmError(RuntimeError):
    """The cluster could not be started (the message ends with the daemons' log tails)."""


def missing_binaries() -> list[str]:
    """The daemons and client commands that are not installed (sbin included: root's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=path) is None]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on every interface (slurmctld and slurmd listen on all)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]


def _parse_fields(line: str) -> dict[str, str]:
    """``Key=Value Key=Value`` (``scontrol -o``, jobcomp/filetxt) to a dict; a value may hold spaces."""
    fields = re.split(r"\s+(?=[A-Za-z][\w:/]*=)", line.strip())
    return dict(field.split("=", 1) for field in fields if "=" in field)


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class SlurmCluster:
    """munged, slurmctld and slurmd started from ``folder``; ``stop()`` cancels the jobs and ends them.

    ``env`` is what a child process (sbatch, srun, submitit's process) needs: this environment
    with ``SLURM_CONF`` pointing at the cluster and no ``SLURM_*``/``SBATCH_*`` settings inherited
    from an enclosing job."""

    def __init__(self, folder: Path | str) -> None:
        self.dir = Path(folder).resolve()
        self.conf = self.dir / "slurm.conf"
        self.jobcomp_log = self.dir / "jobcomp.log"
        self.host = socket.gethostname().split(".")[0]
        self.sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        inherited = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        self.env["SLURM_CONF"] = str(self.conf)
        self.procs: dict[str, subprocess.Popen] = {}

    # -- starting and stopping ---------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> SlurmCluster:
        """Write the configuration, start the daemons, wait until the node is idle."""
        if os.geteuid() != 0:
            raise SlurmError("the SLURM test cluster needs root (munged, slurmctld and slurmd run as root)")
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)")
        atexit.register(self.stop)
        try:
            self._write_files()
            deadline = time.monotonic() + timeout
            self._daemon("munged", "-F", "--force", *self._munge_paths())
            self._wait(lambda: (self.dir / "munge.socket").exists(), deadline, "munged to create its socket")
            self._daemon("slurmctld", "-D", "-c", "-f", str(self.conf))
            self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, deadline, "slurmctld")
            self._daemon("slurmd", "-D", "-f", str(self.conf), "-N", self.host)
            self._wait(lambda: self.node_state() == "idle", deadline, "the node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        key = self.dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))  # a munge key is random bytes (mungekey writes 128)
            key.chmod(0o400)
        (self.dir / "plugstack.conf").write_text("")  # not the system's /etc/slurm/plugstack.conf
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(CONF.format(host=self.host, dir=self.dir, ctld_port=ctld_port, slurmd_port=slurmd_port))

    def _munge_paths(self) -> list[str]:
        # --force: munged refuses a socket folder that not everyone can enter (pytest's are 0700);
        # only root talks to this one.
        names = {"socket": "munge.socket", "key-file": "munge.key", "pid-file": "munged.pid"}
        names |= {"log-file": "munged.log", "seed-file": "munged.seed"}
        return [f"--{option}={self.dir / name}" for option, name in names.items()]

    def _daemon(self, name: str, *args: str) -> None:
        """Start a daemon in the foreground, in its own session (Ctrl-C and pytest leave it alone)."""
        exe = shutil.which(name, path=self.sbin) or name
        with open(self.dir / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [exe, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.dir, start_new_session=True,
            )  # fmt: skip

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while not ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else "timed out"
                raise SlurmError(f"SLURM test cluster in {self.dir}: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        """The tails of the daemons' logs and outputs, for an error message."""
        parts = []
        for name in DAEMONS:
            # The output, when there is no log: what came before the log opened (a bad slurm.conf).
            for path in (self.dir / f"{name}.log", self.dir / f"{name}.out"):
                text = _tail(path).strip()
                if text:
                    parts.append(f"--- {path.name}\n{text}")
                    break
        return "\n".join(parts) or "(no daemon logs)"

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job, wait (up to ``timeout``) for them to end, then stop the daemons."""
        if not self.procs:
            return
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                ids = [job["id"] for job in self.squeue()]
                if ids:
                    self.run("scancel", *ids, check=False)
                    deadline = time.monotonic() + timeout
                    while self.squeue() and time.monotonic() < deadline:
                        time.sleep(0.2)
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _end(proc)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what a test asks ---------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster; ``check``: raise with its output when it fails."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def node_state(self) -> str:
        """The node's state in sinfo (idle, mixed, alloc, down, ...); "" when sinfo cannot tell."""
        proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return proc.stdout.strip().rstrip("*~#") if proc.returncode == 0 else ""

    def squeue(self, all_states: bool = False) -> list[dict[str, str]]:
        """This cluster's jobs: ``id``, ``state`` (PENDING, RUNNING, ...), ``name``; the queued and
        running ones, or with ``all_states`` also those finished in the last MinJobAge (600 s)."""
        args = ["squeue", "-h", "-o", "%i|%T|%j", *(["--states=all"] if all_states else [])]
        lines = self.run(*args).stdout.splitlines()
        return [dict(zip(("id", "state", "name"), line.split("|", 2), strict=True)) for line in lines if line]

    def job(self, jobid: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, StdOut, ...); finished jobs too
        (for MinJobAge). LookupError when SLURM does not know the job."""
        proc = self.run("scontrol", "-o", "show", "job", str(jobid), check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise LookupError(f"job {jobid}: {proc.stderr.strip() or 'not known'}")
        return _parse_fields(proc.stdout.splitlines()[0])

    def completed(self) -> list[dict[str, str]]:
        """The jobcomp/filetxt log: one dict per ended run (JobId, JobState, ExitCode, ...); a
        requeued job has a line per run, the earlier ones with the state it was requeued in (PENDING)."""
        if not self.jobcomp_log.exists():
            return []
        return [_parse_fields(line) for line in self.jobcomp_log.read_text().splitlines() if line.strip()]

    def wait_state(self, jobid: int | str, states: Iterable[str], timeout: float = 60) -> dict[str, str]:
        """Poll ``job(jobid)`` until its JobState is one of ``states``; SlurmError after ``timeout``."""
        wanted, deadline = set(states), time.monotonic() + timeout
        while (job := self.job(jobid))["JobState"] not in wanted:
            if time.monotonic() > deadline:
                raise SlurmError(f"job {jobid} is {job['JobState']} after {timeout} s, not {sorted(wanted)}")
            time.sleep(0.2)
        return job


def _end(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM a daemon, SIGKILL its session if it has not ended after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    # Explicitly: a shell starts a background job with SIGINT ignored, and kill sends SIGTERM.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    folder = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="sketchsweep-slurm-"))
    folder.mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(folder)
    try:
        cluster.start()
    except SlurmError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"SLURM cluster up: node {cluster.host}, partition debug. In another shell:", flush=True)
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    print("Ctrl-C stops it.", flush=True)
    try:
        while all(proc.poll() is None for proc in cluster.procs.values()):
            time.sleep(1)
        print(f"a daemon exited:\n{cluster.logs()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
