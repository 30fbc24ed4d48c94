"""A Hydra sweeper on Optuna: ask the study for a trial, launch it as a Hydra job, tell the result.

Unlike hydra-optuna-sweeper (optuna<3), each job reaches its own trial through the study's
storage (``sweep.study_name/storage/trial_number`` overrides), so the training loop reports every
epoch and stops pruned trials, with any launcher. Studies live in persistent storage (a Journal
file by default), so re-running a killed sweep continues it: ``n_trials`` is the study's total.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import warnings
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from sketchsweep.trial import masked

log = logging.getLogger("sketchsweep.sweeper")

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "grid": optuna.samplers.GridSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
}
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER_ENV = "SKETCHSWEEP_WORKER"  # this worker's index among several on one study


def fail_stale(study: optuna.Study) -> None:
    """Optuna's own stale-trial check (what ``Study.optimize`` runs before each trial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class Heartbeat:
    """Record the heartbeat of running trials every ``interval`` seconds from a thread of this
    process, which (with Hydra's basic launcher) is the one training them: if it dies, they stop
    beating and another worker fails and re-queues them. A missed beat (database briefly
    unreachable) is logged, not raised."""

    def __init__(self, storage, trial_ids: list[int], interval: int) -> None:
        self.storage, self.trial_ids, self.interval = storage, trial_ids, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        if self.storage is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            for trial_id in self.trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:
                    log.warning("heartbeat of trial id %d not recorded: %s", trial_id, e)


def distribution(override: Override) -> BaseDistribution | str:
    """Hydra's sweep grammar -> an Optuna distribution; a plain value stays a fixed override.

    ``choice(a, b)`` and ``range(1, 5)`` are categorical; ``interval(lo, hi)`` is a float (or an
    int when both ends are ints, e.g. ``int(interval(8, 64))``); ``tag(log, interval(...))`` samples
    on a log scale."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    if override.is_choice_sweep() or override.is_range_sweep():
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    value = override.value()
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params: {override.input_line} is not a search space Optuna can sample")


def search_space(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(arguments):
        value = distribution(override)
        if isinstance(value, BaseDistribution):
            space[override.get_key_element()] = value
        else:
            fixed[override.get_key_element()] = value
    return space, fixed


class OptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        self.conf = OmegaConf.create(conf)
        self.objectives = list(conf["objective"]) if not isinstance(conf["objective"], str) else [conf["objective"]]
        directions = conf["direction"]
        self.directions = [directions] if isinstance(directions, str) else [str(d) for d in directions]
        if len(self.directions) != len(self.objectives):
            raise ValueError(
                f"hydra.sweeper: {len(self.objectives)} objective(s) {self.objectives} but "
                f"{len(self.directions)} direction(s) {self.directions}; give one direction per objective"
            )
        if conf["sampler"] not in SAMPLERS:
            raise ValueError(f"hydra.sweeper.sampler={conf['sampler']}: expected one of {sorted(SAMPLERS)}")

    @property
    def pruner_kwargs(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.conf.pruner_kwargs) if self.conf.pruner_kwargs else {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

    # -- study ---------------------------------------------------------------------------------
    def _sampler(self, space: dict[str, BaseDistribution], shared: bool = False) -> optuna.samplers.BaseSampler:
        kwargs = dict(self.conf.sampler_kwargs or {})
        if self.conf.seed is not None:
            # Workers on one study with one seed would sample the same params: offset it by the
            # worker's index (set by `python -m sketchsweep.workers`; 0 for a lone sweep).
            kwargs.setdefault("seed", self.conf.seed + int(os.environ.get(WORKER_ENV, "0")))
        if shared and self.conf.sampler == "tpe":
            kwargs.setdefault("constant_liar", True)  # do not propose what other workers are running
        if self.conf.sampler == "grid":
            grid = {}
            for name, d in space.items():
                if not isinstance(d, CategoricalDistribution):
                    raise ValueError(f"hydra.sweeper.sampler=grid: {name} must be choice(...) or range(...)")
                grid[name] = list(d.choices)
            return optuna.samplers.GridSampler(grid, **kwargs)
        return SAMPLERS[self.conf.sampler](**kwargs)

    def _study_name(self, space: dict[str, BaseDistribution], fixed: dict[str, str]) -> str:
        if self.conf.study_name:
            return str(self.conf.study_name)
        # Same search space and fixed overrides -> same name: re-running a command resumes it.
        text = repr(sorted((k, repr(v)) for k, v in space.items())) + repr(sorted(fixed.items()))
        text += repr((self.objectives, self.directions))
        return f"sweep-{hashlib.sha1(text.encode()).hexdigest()[:10]}"

    def _storage(self, study_name: str) -> str:
        if self.conf.storage:
            return str(self.conf.storage)
        from sketchsweep.config import PROJECT_ROOT

        return str(PROJECT_ROOT / "mlruns" / "optuna" / f"{study_name}.journal")

    # -- sweep ---------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        from sketchsweep.trial import make_pruner, open_storage

        params = [f"{k}={v}" for k, v in (self.conf.params or {}).items()]
        space, fixed = search_space([*params, *arguments])
        if not space:
            raise ValueError("hydra.sweeper: no search space; give hydra.sweeper.params or sweep overrides")
        name = self._study_name(space, fixed)
        storage_spec = self._storage(name)
        shared = "://" in storage_spec  # a database: several workers may share the study
        self.parent = None
        storage = open_storage(
            storage_spec,
            heartbeat_interval=self.conf.heartbeat_interval if shared else None,
            grace_period=self.conf.grace_period if shared else None,
            on_stale=self._on_stale if shared else None,
        )
        kwargs = {"sampler": self._sampler(space, shared), "pruner": make_pruner(self.conf.pruner, self.pruner_kwargs)}
        try:  # the worker that creates the study also creates its MLflow parent run
            study = optuna.create_study(study_name=name, storage=storage, directions=self.directions, **kwargs)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage, **kwargs)
            created = False
        if not shared:
            # A journal study has one sweep process: a trial left RUNNING is from a killed sweep and
            # will never finish, so it is a failure (not counted towards n_trials).
            # (WAITING trials are enqueued ones: ask() runs them; Optuna cannot tell() them.)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        done = len(study.get_trials(deepcopy=False, states=DONE))
        log.info(
            "study %s (%s): %d of %d trials done; sampler %s, pruner %s; storage %s",
            *(name, ", ".join(self.directions), done, self.conf.n_trials, self.conf.sampler, self.conf.pruner),
            masked(storage_spec),
        )
        from sketchsweep.tracking import SweepRun

        self.parent = SweepRun(self.config, name, space, self.objectives, self.directions, study=study, created=created)
        failures, trials = 0, []
        try:
            while True:
                if shared:
                    fail_stale(study)  # trials of workers that died: FAIL, re-queued by _on_stale
                trials = []
                states = [t.state for t in study.get_trials(deepcopy=False)]
                done, running = sum(s in DONE for s in states), states.count(TrialState.RUNNING)
                if done >= self.conf.n_trials:
                    break
                free = self.conf.n_trials - done - running  # WAITING trials (retries) fill free slots
                if free <= 0:
                    if not shared:
                        break
                    # The rest is running on other workers: stay, to take over their trials if they die.
                    time.sleep(min(2.0, self.conf.heartbeat_interval))
                    continue
                for _ in range(min(self.conf.n_jobs, free)):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize": it is, here
                        trial = study.ask(space)
                    if shared:
                        storage.record_heartbeat(trial._trial_id)
                    if self._surplus(study, trial):
                        continue
                    trials.append(trial)
                if not trials:
                    continue
                overrides = [self._overrides(t, fixed, name, storage_spec, self.parent.run_id) for t in trials]
                self.validate_batch_is_legal(overrides)
                with Heartbeat(
                    storage if shared else None, [t._trial_id for t in trials], self.conf.heartbeat_interval
                ):
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                self.job_idx += len(returns)
                for trial, ret in zip(trials, returns, strict=True):
                    try:
                        values = ret.return_value  # raises the job's exception if it failed
                        values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
                        if any(not math.isfinite(v) for v in values):
                            raise ValueError(f"non-finite objective {values}")
                        # PRUNED trials were already told by their job: leave them as they are.
                        study.tell(trial, values, skip_if_finished=True)
                    except Exception as e:
                        failures += 1
                        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                        log.warning("trial %d failed (%d so far): %s: %s", trial.number, failures, type(e).__name__, e)
                        if failures > self.conf.max_failures:
                            raise RuntimeError(
                                f"{failures} trials failed, more than hydra.sweeper.max_failures="
                                f"{self.conf.max_failures}; the study {name} keeps what finished"
                            ) from e
                trials = []
        except BaseException as e:  # Ctrl-C: KILLED; too many failures or a bad override: FAILED
            for trial in trials:  # a trial cut off here will never finish
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self.parent.end(study, "FAILED" if isinstance(e, Exception) else "KILLED")
            raise
        self.parent.end(study, "FINISHED")
        self._log_best(study)

    def _surplus(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Give up a trial asked after other workers took the last of ``n_trials``.

        Optuna has no atomic "ask only if fewer than N", but trial numbers are assigned in a
        database transaction: a trial with ``n_trials`` live (not FAIL) trials numbered before it
        is one too many. It is told FAIL, tagged with the user attribute ``sketchsweep.surplus``,
        without being trained."""
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != TrialState.FAIL]
        if len(ahead) < self.conf.n_trials:
            return False
        trial.set_user_attr("sketchsweep.surplus", f"n_trials={self.conf.n_trials} taken by other workers")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        log.info("trial %d not run: the study's %d trials are taken by other workers", trial.number, len(ahead))
        return True

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker stopped beating (killed, preempted) was just failed: re-queue it
        with the same params (up to ``max_retry`` times) and end its MLflow run as KILLED."""
        history = trial.system_attrs.get("retry_history", [])
        retried = len(history) < self.conf.max_retry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.conf.max_retry)(study, trial)
        why = f"worker lost (no heartbeat for {self._grace()} s): optuna FAIL, " + (
            "re-queued with the same params" if retried else f"not retried (max_retry={self.conf.max_retry})"
        )
        log.warning("trial %d: %s", trial.number, why)
        if self.parent is not None:
            self.parent.end_lost_trial(study.study_name, trial.number, why)

    def _grace(self) -> int:
        return self.conf.grace_period or 2 * self.conf.heartbeat_interval

    def _overrides(self, trial, fixed: dict[str, str], name: str, storage: str, parent_run_id: str) -> tuple[str, ...]:
        sweep = [
            f"sweep.study_name={name}",
            f"sweep.storage='{storage}'",
            f"sweep.trial_number={trial.number}",
            f"sweep.objectives=[{','.join(self.objectives)}]",
            f"sweep.parent_run_id={parent_run_id}",
            f"sweep.pruner={self.conf.pruner}",
            f"sweep.pruner_kwargs='{json.dumps(self.pruner_kwargs)}'",
        ]
        if OmegaConf.to_container(self.config.hydra.sweep)["subdir"] == "${hydra.job.num}":
            # Job numbers restart at 0 in every worker; trial numbers are unique in the study.
            sweep.append(f"hydra.sweep.subdir=trial-{trial.number}")
        return (*(f"{k}={v}" for k, v in trial.params.items()), *(f"{k}={v}" for k, v in fixed.items()), *sweep)

    def _log_best(self, study: optuna.Study) -> None:
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            log.warning("no trial completed")
        elif len(self.directions) == 1:
            log.info(
                "best trial %d: %s=%s %s",
                study.best_trial.number,
                self.objectives[0],
                study.best_value,
                study.best_params,
            )
        else:
            log.info("Pareto front: %d trials", len(study.best_trials))
