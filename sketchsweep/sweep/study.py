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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from sketchsweep import cli
from sketchsweep.cli import UserError, redact
from sketchsweep.config import SWEEP_OBJECTIVES
from sketchsweep.credentials import share
from sketchsweep.sweep import WORKER_ENV, report
from sketchsweep.sweep.check import Compose, check_sweep
from sketchsweep.sweep.console import quiet_launchers, result_line, short
from sketchsweep.sweep.parent import SweepRun
from sketchsweep.sweep.ship import ship
from sketchsweep.sweep.space import (
    PRUNERS,
    SAMPLERS,
    Fixed,
    Pruner,
    Sampler,
    as_overrides,
    grid_size,
    make_pruner,
    make_sampler,
)
from sketchsweep.sweep.space import search_space as parse_space
from sketchsweep.sweep.storage import (
    JOURNAL_DIR,
    Heartbeat,
    fail_stale,
    is_database,
    journal_owner,
    open_storage,
    trial_id,
)

log = logging.getLogger("sketchsweep.sweeper")

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
DIRECTIONS = ("maximize", "minimize")
Launch = Callable[[list[Sequence[str]]], Sequence[JobReturn]]
Settings = tuple[DictConfig, list[str], list[str]]  # read_settings: hydra.sweeper, objectives, directions


@dataclass
class SweeperSettings:
    """``hydra.sweeper.*`` for ``hydra/sweeper=optuna`` (README: Sweeps)."""

    sampler: Sampler = Sampler.tpe
    # The sampler's and pruner's own arguments, whatever they take. Any and null rather than a
    # typed {}: hydra.sweeper.pruner_kwargs={...} must be able to set new keys (a struct {} refuses
    # them, and OmegaConf 2.3 cannot merge a dict into a typed null).
    sampler_kwargs: Any = None
    seed: int | None = None  # the sampler's, offset by the worker and the study's progress: sampler_seed
    pruner: Pruner = Pruner.median
    pruner_kwargs: Any = None
    # One metric and direction, or lists of them for a multi-objective study (checked by
    # read_settings: OmegaConf has no union types). Metrics: config.SWEEP_OBJECTIVES.
    objective: Any = "val_acc"
    direction: Any = "maximize"
    n_trials: int = 20  # the study's total: a resumed study runs only what is missing
    n_jobs: int = 1  # trials handed to the launcher at a time (for parallel launchers)
    study_name: str | None = None  # null: derived from the search space, so the same command resumes
    # A .journal path (one sweep process per study) or a database URL, e.g.
    # postgresql+psycopg://user@host/db (several workers); null: <project>/mlruns/optuna/<study>.journal
    storage: str | None = None
    max_failures: int = 3  # failed trials tolerated before the sweep gives up
    # Database storages only: a running trial's worker records a heartbeat every heartbeat_interval
    # seconds; one silent for grace_period seconds (null: twice the interval) is failed by another
    # worker and re-queued with the same params max_retry times.
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 1
    params: dict[str, str] | None = None  # the search space, in Hydra's override grammar


def _names(value: Any) -> list[str]:
    values = [value] if isinstance(value, (str, Sampler, Pruner)) or value is None else list(value)
    return [str(getattr(v, "value", v)) for v in values]


def read_settings(conf: dict[str, Any]) -> tuple[DictConfig, list[str], list[str]]:
    """``hydra.sweeper`` as typed settings, its objectives and their directions; a name that is
    not known fails here, before any study or run is touched."""
    conf = {k: v for k, v in conf.items() if k != "_target_"}
    for key, known in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if key in conf and (name := _names(conf[key])[0]) not in known:
            raise UserError(f"hydra.sweeper.{key}={name}: expected one of {sorted(known)}")
    settings = OmegaConf.merge(OmegaConf.structured(SweeperSettings), conf)
    objectives, directions = _names(settings.objective), _names(settings.direction)
    if len(directions) != len(objectives):
        raise UserError(
            f"hydra.sweeper: {len(objectives)} objective(s) {objectives} but {len(directions)} direction(s) "
            f"{directions}; give one direction per objective"
        )
    if unknown := [o for o in objectives if o not in SWEEP_OBJECTIVES]:
        raise UserError(f"hydra.sweeper.objective: {unknown} unknown; expected some of {list(SWEEP_OBJECTIVES)}")
    if unknown := [d for d in directions if d not in DIRECTIONS]:
        raise UserError(f"hydra.sweeper.direction: {unknown} unknown; expected {' or '.join(DIRECTIONS)}")
    return settings, objectives, directions


SEED_STRIDE = 10_007  # more workers than this on one study are not expected: see sampler_seed


def sampler_seed(seed: int | None, worker: int, progress: int) -> int | None:
    """The sampler's seed for worker ``worker`` joining a study of ``progress`` trials: ``seed + worker``
    on a new study (workers on one seed would sample alike), and a new one each time a study is
    resumed (a killed sweep run again, a worker restarted): the seed it started with would propose
    again, in order, what the study already trained."""
    return None if seed is None else (seed + worker + progress * SEED_STRIDE) % 2**32


def _recorded(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number``'s result is in the study (COMPLETE or PRUNED)."""
    return any(t.number == number and t.state in DONE for t in study.get_trials(deepcopy=False))


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node) if node else {}


class Sweep:
    """One sweep process on one study (several such processes may share a database study)."""

    def __init__(self, settings: Settings, config: DictConfig, launch: Launch, compose: Compose | None = None) -> None:
        """``settings``: what ``read_settings`` returns; ``compose``: a job's config (``check``)."""
        self.settings, self.objectives, self.directions = settings
        self.config, self.launch, self.compose = config, launch, compose
        self.parent: SweepRun | None = None
        self.in_flight: list[optuna.Trial] = []  # asked, launched, not yet told
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
        if _names(s.sampler)[0] == "grid" and grid_size(space) < self.n_trials:
            self.n_trials = grid_size(space)  # past that the grid sampler repeats points
            log.info(
                "hydra.sweeper.n_trials=%d: the grid has %d points, so the study's total is %d",
                *(s.n_trials, self.n_trials, self.n_trials),
            )
        self.name = self._study_name(space, fixed)
        self.spec = str(s.storage) if s.storage else str(JOURNAL_DIR / f"{self.name}.journal")
        self.shared = is_database(self.spec)  # several workers may share the study
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
            for trial in self.in_flight:  # a trial cut off here will never finish
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self.parent.end(study, "FAILED" if isinstance(e, Exception) else "KILLED")
            raise
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        report.write_best_yaml(sweep_dir / "best.yaml", study, self.objectives, self.directions, fixed)
        self.parent.end(study, "FINISHED")
        log.info("%s", report.summary(study, self.objectives, self.directions, fixed))

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
            *(self.name, ", ".join(self.directions), done, self.n_trials, _names(s.sampler)[0], seed),
            *(_names(s.pruner)[0], redact(self.spec)),
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
        s = self.settings
        while True:
            if self.shared:
                fail_stale(study)  # trials of workers that died: FAIL, re-queued by _on_stale
            states = [t.state for t in study.get_trials(deepcopy=False)]
            done, running = sum(st in DONE for st in states), states.count(TrialState.RUNNING)
            if done >= self.n_trials:
                return  # a signal held meanwhile is too late to cut anything
            self.signals.check()  # a signal held through the last writes stops the sweep here
            free = self.n_trials - done - running  # WAITING trials (retries) fill free slots
            if free <= 0:
                if not self.shared:
                    return
                # The rest is running on other workers: stay, to take over their trials if they die.
                with self.signals.interruptible():
                    time.sleep(min(2.0, s.heartbeat_interval))
                continue
            self._ask(study, space, min(s.n_jobs, free))
            if not self.in_flight:
                continue
            overrides = [self._overrides(t, fixed) for t in self.in_flight]
            ids = [trial_id(study, t.number) for t in self.in_flight]
            for t in self.in_flight:
                log.info("trial %d: %s", t.number, " ".join(f"{k}={short(v)}" for k, v in t.params.items()))
            heartbeat = Heartbeat(self.storage if self.shared else None, ids, s.heartbeat_interval)
            with heartbeat, self.signals.interruptible():  # a trial's setup, or the whole job on another launcher
                returns = self.launch(overrides)
            self._tell(study, returns)
            self.parent.refresh(study)  # the parent's counts, best and trials.csv; its plots now and then
            self.in_flight = []

    def _ask(self, study: optuna.Study, space: dict[str, BaseDistribution], n: int) -> None:
        """Ask up to ``n`` trials into ``in_flight``, each as soon as it is asked: a sweep stopped
        while asking fails the ones it has (they would stay RUNNING)."""
        for _ in range(n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize": it is, here
                trial = study.ask(space)
            self.in_flight.append(trial)
            if self.shared:
                self.storage.record_heartbeat(trial_id(study, trial.number))
            if self._surplus(study, trial):
                self.in_flight.remove(trial)

    def _tell(self, study: optuna.Study, returns: Sequence[JobReturn]) -> None:
        for trial, ret in zip(self.in_flight, returns, strict=True):
            try:
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
                self.failures += 1
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
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
        """A trial whose worker stopped beating (killed, preempted) was just failed: re-queue it
        with the same params (up to ``max_retry`` times) and end its MLflow run as KILLED."""
        max_retry = self.settings.max_retry
        retried = len(trial.system_attrs.get("retry_history", [])) < max_retry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)
        grace = self.settings.grace_period or 2 * self.settings.heartbeat_interval
        why = f"worker lost (no heartbeat for {grace} s): optuna FAIL, " + (
            "re-queued with the same params" if retried else f"not retried (max_retry={max_retry})"
        )
        log.warning("trial %d: %s", trial.number, why)
        if self.parent is not None:
            self.parent.end_lost_trial(study.study_name, trial.number, why)

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
            f"sweep.pruner={_names(s.pruner)[0]}",
            f"sweep.pruner_kwargs='{json.dumps(_plain(s.pruner_kwargs))}'",
        ]
        if OmegaConf.to_container(self.config.hydra.sweep)["subdir"] == "${hydra.job.num}":
            # Job numbers restart at 0 in every worker; trial numbers are unique in the study.
            sweep.append(f"hydra.sweep.subdir=trial-{trial.number}")
        # Overrides are logged and recorded: a password in one (a tracking URI's) reaches the job
        # through the environment instead (sketchsweep.tracking.tracking_uri shared it).
        return (*as_overrides(trial.params), *map(redact, as_overrides(fixed)), *sweep)
