"""The Hydra-facing side of the sweeper: Hydra instantiates this class (plugins must live under
``hydra_plugins``); ``sketchsweep.sweep.study.Sweep`` does the work."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sketchsweep import cli
from sketchsweep.sweep.jobs import Batch, Submitted, is_submitit
from sketchsweep.sweep.settings import read_settings
from sketchsweep.sweep.study import Sweep

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
def _interrupted(name: Callable[[], str | None]) -> Iterator[None]:
    """Ctrl-C or SIGTERM, in the sweep or in a trial (which exits 130 itself): exit 130 with one
    line saying how to continue, not a ``KeyboardInterrupt`` traceback."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and e.code != cli.INTERRUPTED:
            raise
        study = f"study {found}" if (found := name()) else "the study"
        log.warning("sweep stopped; %s keeps its finished trials: run the same command to continue it", study)
        sys.exit(cli.INTERRUPTED)


class OptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        with _bad_input():  # a bad setting fails now, before Hydra sets anything up
            self.settings = read_settings(conf)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

    def sweep(self, arguments: list[str]) -> None:
        sweep: Sweep | None = None
        with _bad_input(), _interrupted(lambda: getattr(sweep, "name", None)):
            # Inside: a launcher submitit cannot build is one line; Ctrl-C while sacct is probed, 130.
            if is_submitit(self.launcher):
                jobs = Submitted(self.launcher)
            else:  # Hydra's basic launcher runs a batch's jobs one after another, in this process
                jobs = Batch(self._launch, parallel=type(self.launcher).__name__ != "BasicLauncher")
            sweep = Sweep(self.settings, self.config, jobs, compose=self._compose)
            sweep.run(arguments)

    def _compose(self, overrides: list[str]) -> DictConfig:
        """A job's config from its overrides, as the launcher composes it: checked before the first trial."""
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _launch(self, overrides: list[Sequence[str]]) -> Sequence[JobReturn]:
        # Not Hydra's validate_batch_is_legal: it composes every job's config once more before the
        # launcher does (~0.1 s a trial); the search space was checked before the first trial
        # (sketchsweep.sweep.check), and the launcher's own compose fails a bad job the same way.
        returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        self.job_idx += len(returns)
        return returns
