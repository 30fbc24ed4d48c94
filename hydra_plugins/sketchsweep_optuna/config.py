"""``hydra/sweeper=optuna``: the sweeper's config, registered when Hydra scans ``hydra_plugins``."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sketchsweep_optuna.sweeper.OptunaSweeper"
    # tpe | random | cmaes | gp | grid | nsgaii, with their constructor arguments
    sampler: str = "tpe"
    # null by default rather than {}: so that hydra.sweeper.sampler_kwargs={...} can set new keys
    sampler_kwargs: Any = None
    seed: int | None = None
    # median | percentile | successive_halving | hyperband | none, with their constructor arguments
    pruner: str = "median"
    pruner_kwargs: Any = None
    # One metric and direction, or lists of them for a multi-objective study. Metrics: val_acc,
    # val_top3, val_loss (at the trial's best epoch), final_val_acc, ..., num_parameters.
    objective: Any = "val_acc"
    direction: Any = "maximize"
    n_trials: int = 20  # the study's total: a resumed study runs only what is missing
    n_jobs: int = 1  # trials handed to the launcher at a time (for parallel launchers)
    study_name: str | None = None  # null: derived from the search space, so the same command resumes
    # Optuna storage: a .journal path (one sweep process per study) or a database URL, e.g.
    # postgresql+psycopg://user@host/db (several workers); null: <project>/mlruns/optuna/<study>.journal
    storage: str | None = None
    max_failures: int = 3  # failed trials tolerated before the sweep gives up
    # Database storages only (several workers on one study): a running trial's worker records a
    # heartbeat every heartbeat_interval seconds; one silent for grace_period seconds (null: twice
    # the interval) is failed by another worker and re-queued with the same params max_retry times.
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 1
    params: Any = None  # search space in Hydra's override grammar


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sketchsweep")
