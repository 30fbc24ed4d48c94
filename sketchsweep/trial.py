"""The job's side of an Optuna sweep: find this run's trial in the study's storage, report the
objective after every epoch, and stop when the pruner says so.

The sweeper passes ``sweep.study_name``, ``sweep.storage`` and ``sweep.trial_number`` to each job,
so the job reaches its trial through the storage itself: this works with any launcher (in-process,
joblib, submitit), not only when the job runs inside the sweeper's process.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}


def make_pruner(name: str, kwargs: dict | None = None) -> optuna.pruners.BasePruner:
    if name not in PRUNERS:
        raise ValueError(f"hydra.sweeper.pruner={name}: expected one of {sorted(PRUNERS)}")
    return PRUNERS[name](**(kwargs or {}))


def open_storage(spec: str) -> optuna.storages.BaseStorage | str:
    """An Optuna storage URL (``sqlite:///...``, ``postgresql+psycopg://...``) as is; a file path
    becomes a JournalStorage file, which is safe for several processes on one machine."""
    if "://" in spec:
        return spec
    path = Path(spec).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


class TrialLink:
    """This job's trial, for intermediate reports and pruning."""

    def __init__(
        self, study_name: str, storage: str, trial_number: int, pruner: str, pruner_kwargs: str | None
    ) -> None:
        # The pruner is not kept in the storage: the sweeper passes it (name and JSON arguments).
        self.study = optuna.load_study(
            study_name=study_name,
            storage=open_storage(storage),
            pruner=make_pruner(pruner, json.loads(pruner_kwargs) if pruner_kwargs else None),
        )
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, trial_number)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.number = trial_number
        # Optuna prunes single-objective studies only.
        self.can_prune = len(self.study.directions) == 1

    def report(self, value: float, epoch: int) -> bool:
        """Report the objective at ``epoch``; True when the pruner says to stop this trial."""
        if not self.can_prune:
            return False
        self.trial.report(value, step=epoch)
        return self.trial.should_prune()

    def mark_pruned(self) -> None:
        """PRUNED in the study (not FAIL); the sweeper's own tell then leaves it alone."""
        self.study.tell(self.number, state=TrialState.PRUNED)
