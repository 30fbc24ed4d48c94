"""The sweep loop: ask the study for trials, launch them as Hydra jobs, tell their results.

Unlike hydra-optuna-sweeper (optuna<3), each job reaches its own trial through the study's storage
(``sweep.*`` overrides; ``sketchsweep.sweep.link``), so training reports every epoch and stops
pruned trials, with any launcher. Studies live in persistent storage, so re-running a killed sweep
continues it: ``n_trials`` is the study's total, across every worker that shares the study.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from sketchsweep import cli
from sketchsweep.cli import UserError, redact
from sketchsweep.credentials import share
from sketchsweep.sweep import WORKER_ENV, report
from sketchsweep.sweep.check import Compose, check_sweep
from sketchsweep.sweep.console import quiet_launchers, result_line, short
from sketchsweep.sweep.jobs import Finished, JobLost, Jobs
from sketchsweep.sweep.parent import SweepRun
from sketchsweep.sweep.settings import names, sampler_seed
from sketchsweep.sweep.ship import ship
from sketchsweep.sweep.space import (
    Fixed,
    as_overrides,
    grid_size,
    make_pruner,
    make_sampler,
)
from sketchsweep.sweep.space import search_space as parse_space
from sketchsweep.sweep.storage import (
    JOURNAL_DIR,
    Heartbeat,
    check_parallel,
    fail_stale,
    is_database,
    journal_owner,
    open_storage,
    trial_id,
)

log = logging.getLogger("sketchsweep.sweeper")

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
# How long a stopped sweep waits for its cancelled jobs to end their runs: under SLURM's default
# KillWait (30 s), so a sweep that is itself a preempted job still FAILs its trials before SIGKILL.
STOP_GRACE_S = 20
# Optuna 4.9 renamed RetryFailedTrialCallback (deprecated, removed in 6).
Retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
Settings = tuple[DictConfig, list[str], list[str]]  # read_settings: hydra.sweeper, objectives, directions


def _recorded(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number``'s result is in the study (COMPLETE or PRUNED)."""
    return any(t.number == number and t.state in DONE for t in study.get_trials(deepcopy=False))


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node) if node else {}


class Sweep:
    """One sweep process on one study (several such processes may share a database study)."""

    def __init__(self, settings: Settings, config: DictConfig, jobs: Jobs, compose: Compose | None = None) -> None:
        """``settings``: what ``read_settings`` returns; ``compose``: a job's config (``check``)."""
        self.settings, self.objectives, self.directions = settings
        self.config, self.jobs, self.compose = config, jobs, compose
        self.parent: SweepRun | None = None
        self.in_flight: list[optuna.Trial] = []  # asked, launched, not yet told
        self.beating: dict[int, int] = {}  # their trial ids, by number (a database study's heartbeats)
        self.failures = 0
        self.signals = cli.Signals()

    def run(self, arguments: list[str]) -> None:
        """Sweep over ``hydra.sweeper.params`` and the command line's sweep overrides.

        SIGTERM (``kill``, a scheduler's preemption) stops a sweep as Ctrl-C does, at any moment:
        at once while a trial runs (its training holds signals through its own writes, then gives
        this handler back), otherwise once the write to the study or MLflow in progress is done.
        SIGTERM's default action would end the process with its trials and parent run RUNNING."""
        with cli.held_signals() as self.signals, quiet_launchers():
            self._run(arguments)
        if self.signals.pending is not None:  # came after the study's last trial: nothing was cut
            log.warning("signal %d arrived after the study's last trial: the sweep is complete", self.signals.pending)

    def _run(self, arguments: list[str]) -> None:
        s = self.settings
        space, fixed = parse_space([*as_overrides(_plain(s.params)), *arguments])
        if not space:
            raise UserError("hydra.sweeper: no search space; give hydra.sweeper.params or sweep overrides")
        with self.signals.interruptible():  # nothing is created yet (no journal, MLflow run, folder)
            check_sweep(s, space, fixed, self.compose)  # a sweep that cannot work fails before its first trial
        self.n_trials = s.n_trials
        if names(s.sampler)[0] == "grid" and grid_size(space) < self.n_trials:
            self.n_trials = grid_size(space)  # past that the grid sampler repeats points
            log.info(
                "hydra.sweeper.n_trials=%d: the grid has %d points, so the study's total is %d",
                *(s.n_trials, self.n_trials, self.n_trials),
            )
        self.name = self._study_name(space, fixed)
        self.spec = str(s.storage) if s.storage else str(JOURNAL_DIR / f"{self.name}.journal")
        self.shared = is_database(self.spec)  # several workers may share the study
        check_parallel(self.spec, s.n_jobs if self.jobs.parallel else 1, self.jobs.remote)
        # A journal study has one sweep process: it owns the study until it ends (or dies).
        with contextlib.nullcontext() if self.shared else journal_owner(self.spec, self.name):
            self._sweep(space, fixed)

    def _sweep(self, space: dict[str, BaseDistribution], fixed: Fixed) -> None:
        study, created = self._open(space)
        self.parent = SweepRun(self.config, study, space, self.objectives, self.directions, created, fixed=fixed)
        if not self.shared:
            self._fail_orphans(study)
        try:
            self._loop(study, space, fixed)
            self.shipped = ship(study, self.config, self.objectives, self.signals)  # stopped, the command ships again
            self.signals.settle()  # every trial is told: a signal from here on cuts nothing
        except BaseException as e:  # Ctrl-C: KILLED; too many failures or a bad override: FAILED
            try:
                self._abandon(study)
            finally:  # a third Ctrl-C while jobs are cancelled still ends the parent run
                self.parent.end(study, "FAILED" if isinstance(e, Exception) else "KILLED")
            raise
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        report.write_best_yaml(sweep_dir / "best.yaml", study, self.objectives, self.directions, fixed)
        self.parent.end(study, "FINISHED")
        log.info("%s", report.summary(study, self.objectives, self.directions, fixed))

    def _abandon(self, study: optuna.Study) -> None:
        """The sweep stops with trials in flight: cancel their jobs (running elsewhere, they would
        go on without it), then FAIL them and end their MLflow runs that are still RUNNING."""
        try:
            self.jobs.stop(STOP_GRACE_S)
        finally:  # a trial cut off here will never finish, even when cancelling its job failed
            for trial in self.in_flight:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                if self.parent is not None and not _recorded(study, trial.number):
                    why = "its sweep was stopped while it ran: optuna FAIL"
                    self.parent.end_lost_trial(self.name, trial.number, why)

    def _study_name(self, space: dict[str, BaseDistribution], fixed: Fixed) -> str:
        if self.settings.study_name:
            return str(self.settings.study_name)
        # Same search space and fixed overrides -> same name: re-running a command resumes it.
        text = repr(sorted((k, repr(v)) for k, v in space.items())) + repr(sorted(fixed.items(), key=lambda kv: kv[0]))
        text += repr((self.objectives, self.directions))
        return f"sweep-{hashlib.sha1(text.encode()).hexdigest()[:10]}"

    def _open(self, space: dict[str, BaseDistribution]) -> tuple[optuna.Study, bool]:
        """The study, created (True) or loaded (False: another process created it)."""
        s = self.settings
        self.storage = open_storage(
            self.spec,
            heartbeat_interval=s.heartbeat_interval if self.shared else None,
            grace_period=s.grace_period if self.shared else None,
            on_stale=self._on_stale if self.shared else None,
        )
        seed = sampler_seed(s.seed, int(os.environ.get(WORKER_ENV, "0")), self._progress())
        sampler = make_sampler(s.sampler, space, _plain(s.sampler_kwargs), seed, self.shared)
        kwargs = {"storage": self.storage, "sampler": sampler, "pruner": make_pruner(s.pruner, _plain(s.pruner_kwargs))}
        try:  # the worker that creates the study also creates its MLflow parent run
            study, created = optuna.create_study(study_name=self.name, directions=self.directions, **kwargs), True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(self.objectives)  # Optuna's own view (dashboard) names the values
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(study_name=self.name, **kwargs), False
        if (found := [d.name.lower() for d in study.directions]) != self.directions:
            raise UserError(
                f"hydra.sweeper.direction={self.directions}: study {self.name} in {redact(self.spec)} was created to "
                f"{found}; give its directions, or another hydra.sweeper.study_name for a new study"
            )
        done = len(study.get_trials(deepcopy=False, states=DONE))
        log.info(
            "study %s (%s): %d of %d trials done; sampler %s (seed %s), pruner %s; storage %s",
            *(self.name, ", ".join(self.directions), done, self.n_trials, names(s.sampler)[0], seed),
            *(names(s.pruner)[0], redact(self.spec)),
        )
        return study, created

    def _progress(self) -> int:
        """How many trials the study has (any state): 0 for a new study."""
        try:
            study_id = self.storage.get_study_id_from_name(self.name)
        except KeyError:
            return 0
        return len(self.storage.get_all_trials(study_id, deepcopy=False))

    def _fail_orphans(self, study: optuna.Study) -> None:
        """A journal study has one sweep process (it owns the study): a trial left RUNNING is from a
        sweep that was killed and will never finish. It is FAIL (not counted towards n_trials) and
        its MLflow run KILLED, as a dead worker's is on a database.
        (WAITING trials are enqueued ones: ask() runs them; Optuna cannot tell() them.)"""
        why = "its sweep was killed while it ran (found RUNNING when the study was resumed): optuna FAIL"
        assert self.parent is not None
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("trial %d: %s", t.number, why)
            self.parent.end_lost_trial(self.name, t.number, why)

    def _loop(self, study: optuna.Study, space: dict[str, BaseDistribution], fixed: Fixed) -> None:
        """Keep up to ``n_jobs`` trials running until the study has ``n_trials`` done: a batch at a
        time (``jobs.Batch``), or a new trial as soon as one ends (``jobs.Submitted``)."""
        s = self.settings
        storage = self.storage if self.shared else None
        with Heartbeat(storage, lambda: list(self.beating.values()), s.heartbeat_interval):
            while True:
                if self.shared:
                    fail_stale(study)  # trials of workers that died: FAIL, re-queued by _on_stale
                states = [t.state for t in study.get_trials(deepcopy=False)]
                done, running = sum(st in DONE for st in states), states.count(TrialState.RUNNING)
                if done >= self.n_trials and not self.in_flight:
                    return  # a signal held meanwhile is too late to cut anything
                self.signals.check()  # a signal held through the last writes stops the sweep here
                free = self.n_trials - done - running  # WAITING trials (retries) fill free slots
                if free > 0 and len(self.in_flight) < s.n_jobs:
                    self._start(study, space, fixed, min(s.n_jobs - len(self.in_flight), free))
                if not self.in_flight:
                    if not self.shared:
                        return
                    # The rest is running on other workers: stay, to take over their trials if they die.
                    with self.signals.interruptible():
                        time.sleep(min(2.0, s.heartbeat_interval))
                    continue
                with self.signals.interruptible():  # a trial's setup, or the whole job on another launcher
                    finished = self.jobs.wait()
                self._tell(study, finished)
                self.parent.refresh(study)  # the parent's counts, best and trials.csv; its plots now and then

    def _start(self, study: optuna.Study, space: dict[str, BaseDistribution], fixed: Fixed, n: int) -> None:
        """Ask up to ``n`` trials into ``in_flight``, each as soon as it is asked (a sweep stopped
        while asking fails the ones it has: they would stay RUNNING), and start their jobs."""
        for _ in range(n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize": it is, here
                trial = study.ask(space)
            self.in_flight.append(trial)
            if self.shared:
                self.beating[trial.number] = trial_id(study, trial.number)
                self.storage.record_heartbeat(self.beating[trial.number])
            if self._surplus(study, trial):
                self._done(trial)
                break  # the study's trials are taken: asking more would only make more surplus
            log.info("trial %d: %s", trial.number, " ".join(f"{k}={short(v)}" for k, v in trial.params.items()))
            self.jobs.start(trial, self._overrides(trial, fixed))

    def _done(self, trial: optuna.Trial) -> None:
        self.in_flight.remove(trial)
        self.beating.pop(trial.number, None)

    def _tell(self, study: optuna.Study, finished: list[Finished]) -> None:
        for trial, ret in finished:
            self._done(trial)
            try:
                if isinstance(ret, BaseException):
                    raise ret
                values = ret.return_value  # raises the job's exception if it failed
                values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
                if any(not math.isfinite(v) for v in values):
                    raise UserError(f"non-finite objective {values}")
                # PRUNED trials were already told by their job: leave them as they are.
                study.tell(trial, values, skip_if_finished=True)
                log.info("%s", result_line(study, trial.number, self.objectives))
            except Exception as e:
                if _recorded(study, trial.number):
                    log.info("%s", result_line(study, trial.number, self.objectives))
                    continue  # told, then the sampler raised (the grid sampler's stop() outside optimize)
                self._failed(study, trial, e)

    def _failed(self, study: optuna.Study, trial: optuna.Trial, e: Exception) -> None:
        """A trial with no result: FAIL. One whose job its cluster ended is re-queued with the same
        params, and counts towards ``max_failures`` only once it is not (``max_retry`` spent)."""
        if study.get_trials(deepcopy=False)[trial.number].state == TrialState.FAIL:
            log.warning("trial %d: %s; another worker had already failed it (stale) and re-queued it", trial.number, e)
            return
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if isinstance(e, JobLost) and self._retry(study, trial.number, f"{e}: optuna FAIL"):
            return
        self.failures += 1
        if not isinstance(e, JobLost):
            log.warning("trial %d failed (%d so far): %s: %s", trial.number, self.failures, type(e).__name__, e)
        if self.failures > self.settings.max_failures:
            raise RuntimeError(
                f"{self.failures} trials failed, more than hydra.sweeper.max_failures="
                f"{self.settings.max_failures}; the study {self.name} keeps what finished"
            ) from e

    def _surplus(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Give up a trial asked after other workers took the last of ``n_trials``.

        Optuna has no atomic "ask only if fewer than N", but trial numbers are assigned in a
        database transaction: a trial with ``n_trials`` live (not FAIL) trials numbered before it
        is one too many. It is told FAIL, tagged with the user attribute ``sketchsweep.surplus``,
        without being trained."""
        n_trials = self.n_trials
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != TrialState.FAIL]
        if len(ahead) < n_trials:
            return False
        trial.set_user_attr("sketchsweep.surplus", f"n_trials={n_trials} taken by other workers")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        log.info("trial %d not run: the study's %d trials are taken by other workers", trial.number, len(ahead))
        return True

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker stopped beating (killed, preempted) was just failed."""
        grace = self.settings.grace_period or 2 * self.settings.heartbeat_interval
        self._retry(study, trial.number, f"worker lost (no heartbeat for {grace} s): optuna FAIL")

    def _retry(self, study: optuna.Study, number: int, why: str) -> bool:
        """Re-queue FAIL trial ``number`` with the same params (up to ``max_retry`` times: True if
        it was) and end its MLflow run KILLED, saying ``why``."""
        max_retry, trial = self.settings.max_retry, study.get_trials(deepcopy=False)[number]
        retried = len(trial.system_attrs.get("retry_history", [])) < max_retry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            Retry(max_retry=max_retry)(study, trial)
        why += ", re-queued with the same params" if retried else f", not retried (max_retry={max_retry})"
        log.warning("trial %d: %s", number, why)
        if self.parent is not None:
            self.parent.end_lost_trial(study.study_name, number, why)
        return retried

    def _overrides(self, trial: optuna.Trial, fixed: Fixed) -> tuple[str, ...]:
        """The job's overrides: the trial's params, the fixed overrides, and how to reach its trial."""
        s = self.settings
        assert self.parent is not None
        sweep = [
            f"sweep.study_name={self.name}",
            f"sweep.storage='{share(self.spec)}'",  # password hidden: the job finds it in the environment
            f"sweep.trial_number={trial.number}",
            f"sweep.objectives=[{','.join(self.objectives)}]",
            f"sweep.parent_run_id={self.parent.run_id}",
            f"sweep.pruner={names(s.pruner)[0]}",
            f"sweep.pruner_kwargs='{json.dumps(_plain(s.pruner_kwargs))}'",
        ]
        if OmegaConf.to_container(self.config.hydra.sweep)["subdir"] == "${hydra.job.num}":
            # Job numbers restart at 0 in every worker; trial numbers are unique in the study.
            sweep.append(f"hydra.sweep.subdir=trial-{trial.number}")
        # Overrides are logged and recorded: a password in one (a tracking URI's) reaches the job
        # through the environment instead (sketchsweep.tracking.tracking_uri shared it).
        return (*as_overrides(trial.params), *map(redact, as_overrides(fixed)), *sweep)
