"""What a study ships when it ends: the deliverables of its best trials (evaluation artifacts, the
PyTorch model, the ONNX export; ``sketchsweep.deliver``), made once from each trial's run folder
into its finished MLflow run, and the champion registered in the MLflow Model Registry.

Trials stay lean while the sweep runs (``sweep.deliverables=best``, the default): a 20-trial study
exports one model, not twenty. Run again (a resumed study whose best trial changed), it ships the
new best; a trial shipped before is not shipped again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

from sketchsweep import deliver, registry, tracking
from sketchsweep.cli import UserError, one_line
from sketchsweep.config import Deliverables
from sketchsweep.sweep import report

log = logging.getLogger("sketchsweep.sweeper")

MADE = "sketchsweep.deliverables"  # a run's tag once its deliverables are logged


def ship(study: optuna.Study, config: DictConfig, objectives: list[str]) -> list[tuple[FrozenTrial, str | None]]:
    """Make the champions' deliverables (per ``sweep.deliverables``) and register them; returns each
    champion with its registered version (None: not registered, and the log says why)."""
    uri = tracking.tracking_uri(config.mlflow.tracking_uri)
    mode = Deliverables(config.sweep.deliverables)
    shipped = []
    for rank, trial in enumerate(report.champions(study), start=1):
        run_id, run_dir = trial.user_attrs.get("sketchsweep.mlflow_run_id"), trial.user_attrs.get("sketchsweep.run_dir")
        if run_id is None or run_dir is None:
            log.warning("trial %d: no MLflow run recorded in the study (an older sweep): nothing shipped", trial.number)
            shipped.append((trial, None))
            continue
        if mode == Deliverables.best:
            _deliver(uri, trial.number, run_id, Path(run_dir), config.mlflow)
        alias = deliver.CHAMPION if len(study.directions) == 1 else f"pareto-{rank}"
        shipped.append((trial, _register(uri, study, trial, run_id, alias, config, objectives, mode)))
    if len(study.directions) > 1 and shipped:  # a smaller front than last time: its old ranks go
        keep = {f"pareto-{rank}" for rank in range(1, len(shipped) + 1)}
        registry.retire_aliases(uri, deliver.registered_name(config.mlflow), "pareto-", keep)
    return shipped


def _deliver(uri: str, number: int, run_id: str, run_dir: Path, mlflow_cfg) -> None:
    """The deliverables of one trial, once (a run tagged ``MADE`` has them)."""
    wanted = mlflow_cfg.log_evaluation or mlflow_cfg.log_model or mlflow_cfg.log_onnx
    if not wanted or MlflowClient(uri).get_run(run_id).data.tags.get(MADE) == "made":
        return
    log.info("trial %d: making its deliverables (evaluation, models) into MLflow run %s", number, run_id)
    with deliver.from_folder(run_dir) as shipment, tracking.ReopenedRun(uri, run_id) as run:
        deliver.log_deliverables(shipment, run, mlflow_cfg)
        run.set_tags({MADE: "made"})


def _register(
    uri: str, study, trial: FrozenTrial, run_id: str, alias: str, config: DictConfig, objectives: list[str], mode
) -> str | None:
    """Register ``trial``'s model as a new version with ``alias`` (unless the alias already names
    this run's model); None when there is no model to register."""
    if mode == Deliverables.none or not config.mlflow.log_onnx:
        log.warning(
            "trial %d not registered: it logged no model (sweep.deliverables=%s, mlflow.log_onnx=%s)",
            *(trial.number, mode.value, config.mlflow.log_onnx),
        )
        return None
    name = deliver.registered_name(config.mlflow)
    tags = {
        "study": study.study_name,
        "trial": str(trial.number),
        "objective": ",".join(objectives),
        "value": ",".join(f"{v:.6g}" for v in trial.values),
        "data": deliver.data_label(config),
    }
    try:
        current = MlflowClient(uri).get_model_version_by_alias(name, alias)
        if current.run_id == run_id:
            return str(current.version)  # shipped before: a resumed study whose champion did not change
    except MlflowException:
        pass  # no such model or alias yet
    try:
        version = registry.register(uri, run_id, name, alias, tags)
    except UserError as e:
        log.warning("trial %d not registered as %s@%s: %s", trial.number, name, alias, one_line(e))
        return None
    log.info("trial %d registered as models:/%s/%s (alias: models:/%s@%s)", trial.number, name, version, name, alias)
    return version
