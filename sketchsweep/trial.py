"""The job's side of an Optuna sweep: find this run's trial in the study's storage, report the
objective after every epoch, and stop when the pruner says so.

The sweeper passes ``sweep.study_name``, ``sweep.storage`` and ``sweep.trial_number`` to each job,
so the job reaches its trial through the storage itself: this works with any launcher (in-process,
joblib, submitit), not only when the job runs inside the sweeper's process.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

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


class StorageError(ValueError):
    """A storage URL that cannot be used: a missing driver or a database that cannot be reached."""


def masked(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def storage_url(spec: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (the ``[postgres]`` extra), not
    SQLAlchemy's default psycopg2; any other URL is kept as given."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", spec)


# Jobs in one process share one engine (connection pool) per URL instead of one per trial.
_JOB_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def open_storage(
    spec: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """A storage for ``hydra.sweeper.storage``: a database URL becomes an ``RDBStorage`` (with
    Optuna's heartbeat when ``heartbeat_interval`` is given); a file path becomes a JournalStorage
    file, which is safe for several processes on one machine but has no heartbeat."""
    if "://" not in spec:
        path = Path(spec).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    url = storage_url(spec)
    shared = heartbeat_interval is None and on_stale is None
    if shared and url in _JOB_STORAGES:
        return _JOB_STORAGES[url]
    if url.startswith("postgresql+psycopg:"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StorageError(
                f"hydra.sweeper.storage={masked(spec)}: PostgreSQL needs psycopg 3, which is not installed; "
                "expected `pip install 'sketchsweep[postgres]'` (or psycopg[binary])"
            ) from None
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    # pre_ping: a connection the database dropped (a restart) is replaced, not failed on.
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=on_stale,
                )
            break
        except sqlalchemy.exc.SQLAlchemyError as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            # Workers starting together on a new database race to create Optuna's tables: try again.
            if "connect" not in reason.lower() and attempt < 4:
                time.sleep(0.5 + attempt)
                continue
            if "connect" not in reason.lower():
                raise
            raise StorageError(
                f"hydra.sweeper.storage={masked(spec)}: cannot connect to the database ({reason}); expected a "
                "reachable server and an existing database, e.g. postgresql+psycopg://user@host:5432/optuna"
            ) from None
    if shared:
        _JOB_STORAGES[url] = storage
    return storage


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
