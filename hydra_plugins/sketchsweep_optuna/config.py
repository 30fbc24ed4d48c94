"""Registers ``hydra/sweeper=optuna`` (the settings are ``sketchsweep.sweep.settings.SweeperSettings``)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from sketchsweep.sweep.settings import SweeperSettings
from sketchsweep.sweep.space import Pruner, Sampler


@dataclass
class OptunaSweeperConf(SweeperSettings):
    _target_: str = "hydra_plugins.sketchsweep_optuna.sweeper.OptunaSweeper"
    # Plain strings here (read_settings types them): a name that is not known is then its one
    # line naming the known ones (exit 2), not Hydra's several-line composition error (exit 1).
    sampler: str = Sampler.tpe.value
    pruner: str = Pruner.median.value


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sketchsweep")
