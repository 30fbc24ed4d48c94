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
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

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
    def _sampler(self, space: dict[str, BaseDistribution]) -> optuna.samplers.BaseSampler:
        kwargs = dict(self.conf.sampler_kwargs or {})
        if self.conf.seed is not None:
            kwargs.setdefault("seed", self.conf.seed)
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
        from sketchsweep.tracking import SweepRun
        from sketchsweep.trial import make_pruner, open_storage

        params = [f"{k}={v}" for k, v in (self.conf.params or {}).items()]
        space, fixed = search_space([*params, *arguments])
        if not space:
            raise ValueError("hydra.sweeper: no search space; give hydra.sweeper.params or sweep overrides")
        name = self._study_name(space, fixed)
        storage_spec = self._storage(name)
        study = optuna.create_study(
            study_name=name,
            storage=open_storage(storage_spec),
            sampler=self._sampler(space),
            pruner=make_pruner(self.conf.pruner, self.pruner_kwargs),
            directions=self.directions,
            load_if_exists=True,
        )
        # A sweep killed mid-trial leaves it RUNNING: nobody will finish it, so it is a failure
        # (not counted towards n_trials). The study is assumed to have one sweep process.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        done = len(study.get_trials(deepcopy=False, states=DONE))
        log.info(
            "study %s (%s): %d of %d trials done; sampler %s, pruner %s; storage %s",
            *(name, ", ".join(self.directions), done, self.conf.n_trials, self.conf.sampler, self.conf.pruner),
            storage_spec,
        )
        parent = SweepRun(self.config, name, space, self.objectives, self.directions)
        failures, trials = 0, []
        try:
            while done < self.conf.n_trials:
                batch = min(self.conf.n_jobs, self.conf.n_trials - done)
                trials = [study.ask(space) for _ in range(batch)]
                overrides = [self._overrides(t, fixed, name, storage_spec, parent.run_id) for t in trials]
                self.validate_batch_is_legal(overrides)
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
                done = len(study.get_trials(deepcopy=False, states=DONE))
        except BaseException as e:  # Ctrl-C: KILLED; too many failures or a bad override: FAILED
            for trial in trials:  # a trial cut off here will never finish
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            parent.end(study, "FAILED" if isinstance(e, Exception) else "KILLED")
            raise
        parent.end(study, "FINISHED")
        self._log_best(study)

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
