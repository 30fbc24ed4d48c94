"""Registers ``hydra/sweeper=optuna`` (the settings are ``sketchsweep.sweep.study.SweeperSettings``)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from sketchsweep.sweep.study import SweeperSettings


@dataclass
class OptunaSweeperConf(SweeperSettings):
    _target_: str = "hydra_plugins.sketchsweep_optuna.sweeper.OptunaSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sketchsweep")
