"""A job's side of an Optuna sweep: find this run's trial in the study's storage, report the
objective after every epoch, and stop when the pruner says so.

The sweeper passes ``sweep.study_name``, ``sweep.storage`` and ``sweep.trial_number`` to each job,
so the job reaches its trial through the storage itself: this works with any launcher (in-process,
joblib, submitit), not only when the job runs inside the sweeper's process. A storage password is
not in the override (it is logged and recorded): the job finds the real URL in the environment
the sweeper hands its launcher (``sketchsweep.credentials``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sketchsweep.cli import UserError
from sketchsweep.credentials import reveal
from sketchsweep.modelref import CHECKPOINT
from sketchsweep.sweep.space import make_pruner
from sketchsweep.sweep.storage import open_storage, trial_id

# The trial's user attributes its job records (Optuna's own view, the sweep's report): its MLflow
# run, the run's URL, its folder, and which trial recorded them (a re-queued copy inherits them).
log = logging.getLogger("sketchsweep")
RUN_ID_ATTR = "sketchsweep.mlflow_run_id"
URL_ATTR = "sketchsweep.mlflow_url"
RUN_DIR_ATTR = "sketchsweep.run_dir"
TRIAL_ATTR = "sketchsweep.trial_number"


class TrialLink:
    """This job's trial, for intermediate reports and pruning."""

    def __init__(
        self, study_name: str, storage: str, trial_number: int, pruner: str, pruner_kwargs: str | None
    ) -> None:
        # The pruner is not kept in the storage: the sweeper passes it (name and JSON arguments).
        self.storage = open_storage(storage)
        self.study = optuna.load_study(
            study_name=study_name,
            storage=self.storage,
            pruner=make_pruner(pruner, json.loads(pruner_kwargs) if pruner_kwargs else None),
        )
        self.trial_id = trial_id(self.study, trial_number)
        self.trial = optuna.trial.Trial(self.study, self.trial_id)
        self.number = trial_number
        # Optuna prunes single-objective studies only.
        self.can_prune = len(self.study.directions) == 1

    @classmethod
    def of(cls, sweep) -> TrialLink | None:
        """The trial a job's ``sweep.*`` config names (None outside a sweep)."""
        if sweep.trial_number is None:
            return None
        storage = reveal(sweep.storage, "sweep.storage")
        link = cls(sweep.study_name, storage, sweep.trial_number, sweep.pruner, sweep.pruner_kwargs)
        if (state := link.storage.get_trial(link.trial_id).state) != TrialState.RUNNING:
            # Its sweep told it already (it stopped, or a cluster ended the job and the trial was
            # re-queued as a new one): a job started after that has nothing to train for it.
            message = (
                f"sweep.trial_number={link.number}: trial {link.number} of study {sweep.study_name} is "
                f"{state.name}, expected RUNNING: its sweep no longer waits for this job; nothing trained"
            )
            log.error("%s", message)  # in the job's log: no sweep reads this job's return
            raise UserError(message)
        return link

    @property
    def params(self) -> dict[str, Any]:
        """The parameters the sampler gave this trial."""
        return dict(self.trial.params)

    def earlier_checkpoint(self, run_dir: Path) -> Path | None:
        """The checkpoint an earlier job of this same trial left in ``run_dir``: the trial (still
        RUNNING, see ``of``) recorded that folder itself, so this job runs it again (SLURM requeued
        or preempted it; submitit resubmitted it). None for a trial's first job."""
        attrs = self.storage.get_trial(self.trial_id).user_attrs
        checkpoint = run_dir / CHECKPOINT
        earlier = attrs.get(RUN_DIR_ATTR) == str(run_dir) and attrs.get(TRIAL_ATTR) == self.number
        return checkpoint if earlier and checkpoint.exists() else None

    def record_run(self, run_id: str, url: str, run_dir: str) -> None:
        """This trial's MLflow run and folder, as user attributes (Optuna's own view, the sweep's summary)."""
        recorded = {RUN_ID_ATTR: run_id, URL_ATTR: url, RUN_DIR_ATTR: run_dir, TRIAL_ATTR: self.number}
        for key, value in recorded.items():
            self.trial.set_user_attr(key, value)

    def report(self, value: float, epoch: int, last: bool = False) -> bool:
        """Report the objective at ``epoch``; True when the pruner says to stop this trial (never
        after its ``last`` epoch: that one is reported for the record)."""
        if not self.can_prune:
            return False
        self.trial.report(value, step=epoch)
        return not last and self.trial.should_prune()

    def mark_pruned(self) -> None:
        """PRUNED in the study (not FAIL); the sweeper's own tell then leaves it alone."""
        self.study.tell(self.number, state=TrialState.PRUNED)

    def complete(self, values: float | tuple[float, ...]) -> None:
        """COMPLETE with ``values`` in the study, from the job itself, with its MLflow run (a signal
        right after it then loses neither); a trial already PRUNED stays so. Non-finite values are
        left to the sweeper, which counts them as a failure."""
        values = list(values) if isinstance(values, tuple) else [values]
        if all(math.isfinite(v) for v in values):
            self.study.tell(self.number, values, skip_if_finished=True)


def objective_values(objectives, best_value: float, outcome: dict[str, float]) -> float | tuple[float, ...]:
    """What a job returns to a sweeper: ``trainer.objective`` at the best epoch (``best_value``),
    or in a sweep the values of ``sweep.objectives`` in order, read from ``outcome`` (the run's
    summary and num_parameters: ``val_acc`` is the summary's ``best_val_acc``); one float for one."""
    if not objectives:
        return float(best_value)
    # NaN where a run lacks one (val_ece of an epoch trained before it was measured, resumed): not told.
    values = tuple(float(outcome.get(o, outcome.get(f"best_{o}", math.nan))) for o in objectives)
    return values[0] if len(values) == 1 else values
