"""``hydra.sweeper.*``: the sweeper's typed settings (``SweeperSettings``, registered by
``hydra_plugins/sketchsweep_optuna``), read and checked before any study or run is touched, and
the sampler seed of each worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sketchsweep.cli import UserError
from sketchsweep.config import SWEEP_OBJECTIVES
from sketchsweep.sweep.space import PRUNERS, SAMPLERS, Pruner, Sampler

DIRECTIONS = ("maximize", "minimize")


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
    n_jobs: int = 1  # trials running at once: a batch at a time, or (submitit) a new one as one ends
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


def names(value: Any) -> list[str]:
    values = [value] if isinstance(value, (str, Sampler, Pruner)) or value is None else list(value)
    return [str(getattr(v, "value", v)) for v in values]


def read_settings(conf: dict[str, Any]) -> tuple[DictConfig, list[str], list[str]]:
    """``hydra.sweeper`` as typed settings, its objectives and their directions; a name that is
    not known fails here, before any study or run is touched."""
    conf = {k: v for k, v in conf.items() if k != "_target_"}
    for key, known in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if key in conf and (name := names(conf[key])[0]) not in known:
            raise UserError(f"hydra.sweeper.{key}={name}: expected one of {sorted(known)}")
    settings = OmegaConf.merge(OmegaConf.structured(SweeperSettings), conf)
    objectives, directions = names(settings.objective), names(settings.direction)
    if len(directions) != len(objectives):
        raise UserError(
            f"hydra.sweeper: {len(objectives)} objective(s) {objectives} but {len(directions)} direction(s) "
            f"{directions}; give one direction per objective"
        )
    if unknown := [o for o in objectives if o not in SWEEP_OBJECTIVES]:
        raise UserError(f"hydra.sweeper.objective: {unknown} unknown; expected some of {list(SWEEP_OBJECTIVES)}")
    if unknown := [d for d in directions if d not in DIRECTIONS]:
        raise UserError(f"hydra.sweeper.direction: {unknown} unknown; expected {' or '.join(DIRECTIONS)}")
    if settings.n_jobs < 1:
        raise UserError(f"hydra.sweeper.n_jobs={settings.n_jobs}: expected 1 or more (trials running at once)")
    return settings, objectives, directions


SEED_STRIDE = 10_007  # more workers than this on one study are not expected: see sampler_seed


def sampler_seed(seed: int | None, worker: int, progress: int) -> int | None:
    """The sampler's seed for worker ``worker`` joining a study of ``progress`` trials: ``seed + worker``
    on a new study (workers on one seed would sample alike), and a new one each time a study is
    resumed (a killed sweep run again, a worker restarted): the seed it started with would propose
    again, in order, what the study already trained."""
    return None if seed is None else (seed + worker + progress * SEED_STRIDE) % 2**32
