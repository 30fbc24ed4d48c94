"""The Hydra-facing side of the sweeper: Hydra instantiates this class (plugins must live under
``hydra_plugins``); ``sketchsweep.sweep.study.Sweep`` does the work."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sketchsweep import cli
from sketchsweep.sweep.study import Sweep, read_settings

log = logging.getLogger("sketchsweep.sweeper")


@contextlib.contextmanager
def _bad_input() -> Iterator[None]:
    """A bad sweep setting or storage is one line and exit code 2, not Hydra's traceback."""
    try:
        yield
    except cli.UserError as e:
        log.error("%s", cli.message(e))
        sys.exit(cli.BAD_INPUT)


@contextlib.contextmanager
def _interrupted(sweep: Sweep) -> Iterator[None]:
    """Ctrl-C or SIGTERM, in the sweep or in a trial (which exits 130 itself): exit 130 with one
    line saying how to continue, not a ``KeyboardInterrupt`` traceback."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and e.code != cli.INTERRUPTED:
            raise
        study = f"study {sweep.name}" if hasattr(sweep, "name") else "the study"
        log.warning("sweep stopped; %s keeps its finished trials: run the same command to continue it", study)
        sys.exit(cli.INTERRUPTED)


class OptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        self.settings = read_settings(conf)  # a bad setting fails now, before Hydra sets anything up

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context  # validate_batch_is_legal reads both
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

    def sweep(self, arguments: list[str]) -> None:
        sweep = Sweep(self.settings, self.config, self._launch)
        with _bad_input(), _interrupted(sweep):
            sweep.run(arguments)

    def _launch(self, overrides: list[Sequence[str]]) -> Sequence[JobReturn]:
        self.validate_batch_is_legal(overrides)
        returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        self.job_idx += len(returns)
        return returns
