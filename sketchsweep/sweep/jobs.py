"""How a sweep's trials run as Hydra jobs.

- ``Batch``: any Hydra launcher (basic, joblib, ...). Its ``launch`` runs a batch of jobs and
  returns when the last one ends, so a trial pruned after one epoch leaves its slot idle until
  the slowest trial of its batch is done (hydra issue #1954).
- ``Submitted``: a submitit launcher (``hydra/launcher=slurm``, ``submitit_slurm``,
  ``submitit_local``). Each trial is its own job, submitted as it is asked and collected as it
  ends: the sweep asks the next trial as soon as a slot frees, and can cancel its jobs when it
  is stopped. The jobs are what the launcher itself would submit (its executor and parameters).
"""

from __future__ import annotations

import copy
import logging
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn

from sketchsweep.cli import UserError, one_line, redact
from sketchsweep.credentials import scrub_config

log = logging.getLogger("sketchsweep.sweeper")

Launch = Callable[[list[Sequence[str]]], Sequence[JobReturn]]
Finished = tuple[optuna.Trial, "JobReturn | BaseException"]  # a job's return, or why it has none
POLL_S = 1.0  # how often the state of submitted jobs is read (submitit reads result files)
STOP_POLL_S = 2.0  # while a stopped sweep waits for its cancelled jobs (each check may run squeue)
# submitit counts PREEMPTED as unfinished (a job SLURM requeues passes through it): one still
# PREEMPTED this long after it was first seen so, on a fresh read, was not requeued (PreemptMode=CANCEL).
PREEMPTED_S = 60.0
# A job that ended without a result (no Python exception of its own) because the cluster ended it:
# the trial is lost, not wrong, and is re-queued (hydra.sweeper.max_retry). GONE: squeue no longer
# lists it (sketchsweep.sweep.squeue), and no result came.
LOST_STATES = ("CANCELLED", "PREEMPTED", "NODE_FAIL", "TIMEOUT", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "GONE")


class JobLost(RuntimeError):
    """A trial's job ended without a result because its cluster ended it (cancelled, preempted,
    node failure, time limit): the trial may be run again."""


class Batch:
    """A batch at a time through the launcher's ``launch``."""

    remote = False  # jobs on this machine (joblib, ray on a cluster aside)

    def __init__(self, launch: Launch, parallel: bool) -> None:
        """``parallel``: the launcher runs a batch's jobs at once (not Hydra's basic launcher)."""
        self.launch, self.parallel, self.queued = launch, parallel, []

    def start(self, trial: optuna.Trial, overrides: Sequence[str]) -> None:
        self.queued.append((trial, overrides))

    def wait(self) -> list[Finished]:
        """Launch what was started; every job's return once the last has ended."""
        trials, overrides = [t for t, _ in self.queued], [o for _, o in self.queued]
        self.queued = []
        return list(zip(trials, self.launch(overrides), strict=True))

    def stop(self, grace_s: float) -> None:
        """Nothing to cancel: a batch ends with ``launch``."""
        self.queued = []


class Submitted:
    """Each trial its own submitit job, collected as it ends."""

    parallel = True

    def __init__(self, launcher: Any) -> None:
        try:
            self.executor = executor_of(launcher)
        except (ValueError, TypeError) as e:  # a parameter submitit does not know, or of the wrong type
            raise UserError(f"hydra.launcher: {one_line(e)}") from e
        self.remote = launcher._EXECUTOR == "slurm"  # jobs on other machines
        if self.remote:
            from sketchsweep.sweep.squeue import watch_with_squeue  # needs submitit: the slurm extra

            watch_with_squeue()
        # submitit pickles the launcher (the sweep's config) and Hydra's state with each job, in
        # hydra.sweep.dir: their passwords are hidden, and the job gets them from the environment.
        self.launcher = copy.copy(launcher)
        self.launcher.config = scrub_config(launcher.config)
        self.jobs: list[tuple[optuna.Trial, Any]] = []
        self.number = 0  # hydra.job.num of the next job
        self.preempted: dict[str, float] = {}  # job id: when it was first seen PREEMPTED

    def start(self, trial: optuna.Trial, overrides: Sequence[str]) -> None:
        # What BaseSubmititLauncher.launch passes each job, submitted alone rather than as an array.
        try:
            job = self.executor.submit(
                self.launcher, list(overrides), "hydra.sweep.dir", self.number, f"job_id_for_{self.number}", _state()
            )
        except Exception as e:  # sbatch refused it: a partition or resources the cluster does not have
            raise UserError(f"hydra.launcher: trial {trial.number} could not be submitted: {one_line(e)}") from e
        self.number += 1
        self.jobs.append((trial, job))
        log.info("trial %d: job %s", trial.number, job.job_id)

    def wait(self) -> list[Finished]:
        """The jobs that have ended (at least one), with their returns."""
        while not (ended := [(t, j) for t, j in self.jobs if self._ended(j)]):
            time.sleep(POLL_S)
        self.jobs = [(t, j) for t, j in self.jobs if (t, j) not in ended]
        return [(t, outcome(j)) for t, j in ended]

    def stop(self, grace_s: float) -> None:
        """Cancel the running jobs (SLURM sends them SIGTERM: each ends its MLflow run KILLED) and
        wait up to ``grace_s`` seconds for them to end."""
        running, self.jobs = [j for _, j in self.jobs], []
        cancel(running)
        deadline = time.monotonic() + grace_s
        while running and time.monotonic() < deadline:
            time.sleep(STOP_POLL_S)
            running[0].done(force_check=True)  # one squeue (or sacct) call reads every job's state
            running = [j for j in running if not j.done()]
        for job in running:  # a local one that did not end: submitit's own cancel, SIGKILL a second on
            if getattr(job, "_process", None) is not None:
                job.cancel(check=False)

    def _ended(self, job: Any) -> bool:
        """Done, or PREEMPTED for ``PREEMPTED_S`` and still so on a fresh read: not requeued."""
        if job.done():
            return True
        if _job_state(job) != "PREEMPTED":
            self.preempted.pop(job.job_id, None)
            return False
        first = self.preempted.setdefault(job.job_id, time.monotonic())
        return time.monotonic() - first > PREEMPTED_S and _job_state(job, fresh=True) == "PREEMPTED"


def _job_state(job: Any, fresh: bool = False) -> str:
    """A job's state as one word: "CANCELLED" for squeue's or sacct's "CANCELLED by 0"."""
    state = job.watcher.get_state(job.job_id, "force") if fresh else job.state
    return str(state).split()[0].upper() if str(state).strip() else "UNKNOWN"


Jobs = Batch | Submitted


def cancel(jobs: list[Any]) -> None:
    """Cancel ``jobs`` (any may have ended already): one quiet ``scancel`` for SLURM's (submitit's
    cancel prints scancel's complaint about an ended job on the sweep's console); SIGTERM to a
    ``submitit_local`` job's controller (its cancel sends SIGINT, on which the controller SIGKILLs
    the trial a second later; SIGTERM it forwards and waits for: the trial ends its run KILLED)."""
    slurm_ids = []
    for job in jobs:
        if (controller := getattr(job, "_process", None)) is not None:
            if controller.poll() is None:
                controller.send_signal(signal.SIGTERM)
        else:
            slurm_ids.append(str(job.job_id))
    if slurm_ids:
        try:
            subprocess.run(["scancel", *slurm_ids], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("scancel %s: %s", " ".join(slurm_ids), one_line(e))


def _state() -> dict[str, Any]:
    """Hydra's global state, as the launcher hands it to each job, with passwords hidden."""
    state = Singleton.get_state()  # a deep copy
    if (hydra_config := state["instances"].get(HydraConfig)) is not None and hydra_config.cfg is not None:
        hydra_config.cfg = scrub_config(hydra_config.cfg)
    return state


def outcome(job: Any) -> JobReturn | BaseException:
    """A finished job's return; ``JobLost`` when its cluster ended it; the error otherwise."""
    state = _job_state(job)
    if state in LOST_STATES and not job.paths.result_pickle.exists():
        # None will come: submitit's results() would wait 15 s for it, the sweep (every slot) too.
        return _lost(job, state)
    try:
        return job.results()[0]
    except Exception as e:
        state = _job_state(job)
        if state in LOST_STATES:
            return _lost(job, state)
        return RuntimeError(f"its job {job.job_id} ended {state}: {_error_line(str(e))} (log: {job.paths.stderr})")


def _lost(job: Any, state: str) -> JobLost:
    cancel([job])  # its trial runs again as a new one: this job must not (one SLURM would requeue)
    return JobLost(f"its job {job.job_id} ended {state} with no result")


def _error_line(text: str) -> str:
    """The exception line of a submitit failure: its trace sits between two dashed rules, the log
    paths after them."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    body = lines[rules[0] + 1 : rules[1]] if len(rules) >= 2 else lines
    return redact(body[-1].strip()) if body else "no message"


def is_submitit(launcher: Any) -> bool:
    return any(c.__name__ == "BaseSubmititLauncher" for c in type(launcher).__mro__)


def executor_of(launcher: Any) -> Any:
    """The submitit executor ``launcher`` would build (BaseSubmititLauncher.launch, as of
    hydra-submitit-launcher 1.2), with the same parameters."""
    import submitit  # only with a submitit launcher (the ``slurm`` extra)
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    kind, params = launcher._EXECUTOR, dict(launcher.params)
    init_keys = {"submitit_folder", "max_num_timeout"}
    init = {"folder": params["submitit_folder"]}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params["max_num_timeout"]
    try:
        executor = submitit.AutoExecutor(cluster=kind, **init)
    except RuntimeError as e:  # "Could not detect "srun", are you indeed on a slurm cluster?"
        raise UserError(f"hydra/launcher={kind}: {one_line(e)} (no SLURM commands on this machine's PATH)") from None
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    rest = {k if k in base else f"{kind}_{k}": v for k, v in params.items() if k not in init_keys}
    executor.update_parameters(**rest)
    return executor
