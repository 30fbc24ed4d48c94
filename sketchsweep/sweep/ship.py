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
from optuna.trial import FrozenTrial, TrialState

from sketchsweep import deliver, registry, tracking
from sketchsweep.cli import Signals, UserError, one_line
from sketchsweep.config import Deliverables
from sketchsweep.sweep import report

log = logging.getLogger("sketchsweep.sweeper")

MADE = deliver.MADE
ERROR = "sketchsweep.deliverables_error"  # why the last try to make them did not (tracking.ReopenedRun)
Shipped = tuple[FrozenTrial, "str | None"]  # a champion and its registered version


def ship(study: optuna.Study, config: DictConfig, objectives: list[str], signals: Signals) -> list[Shipped]:
    """Make the champions' deliverables (per ``sweep.deliverables``) and register them; returns each
    champion with its registered version (None: not registered, and the log says why). A champion
    that cannot be shipped is one error line, not a failed study: its trials are all recorded.
    Signals are held (``signals``) but where the work is slow (evaluation, export)."""
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.info("other workers still run trials: the last one to finish ships the study's champion")
        return []
    uri = tracking.tracking_uri(config.mlflow.tracking_uri)
    mode = Deliverables(config.sweep.deliverables)
    shipped: list[Shipped] = []
    for rank, trial in enumerate(report.champions(study), start=1):
        alias = deliver.CHAMPION if len(study.directions) == 1 else f"pareto-{rank}"
        try:
            version = _ship(uri, study, trial, alias, config, objectives, mode, signals)
        except Exception as e:  # its run folder and MLflow run keep what it trained
            log.error("trial %d not shipped: %s", trial.number, one_line(e))
            version = None
        shipped.append((trial, version))
    if len(study.directions) > 1 and any(v for _, v in shipped):  # a smaller front than before: old ranks go
        keep = {f"pareto-{rank}" for rank in range(1, len(shipped) + 1)}
        try:
            registry.retire_aliases(uri, deliver.registered_name(config.mlflow), "pareto-", keep)
        except UserError as e:
            log.warning("old pareto-<rank> aliases not removed: %s", one_line(e))
    return shipped


def _ship(
    uri: str, study, trial: FrozenTrial, alias: str, config: DictConfig, objectives: list[str], mode, signals: Signals
) -> str | None:
    run_id, run_dir = trial.user_attrs.get(report.RUN_ID_ATTR), trial.user_attrs.get(report.RUN_DIR_ATTR)
    if run_id is None or run_dir is None:
        log.warning("trial %d: no MLflow run recorded in the study (an older sweep): nothing shipped", trial.number)
        return None
    if mode == Deliverables.best:
        _deliver(uri, trial.number, run_id, Path(run_dir), config.mlflow, signals)
    return _register(uri, study, trial, run_id, alias, config, objectives, mode, signals)


def _deliver(uri: str, number: int, run_id: str, run_dir: Path, mlflow_cfg, signals: Signals) -> None:
    """The deliverables of one trial, once (a run tagged ``MADE`` has them)."""
    wanted = mlflow_cfg.log_evaluation or mlflow_cfg.log_model or mlflow_cfg.log_onnx
    client = MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    if not wanted or tags.get(MADE) == "made":
        return
    signals.check()  # a signal held since the last trial stops the sweep before this work (rerun: made then)
    log.info("trial %d: making its deliverables (evaluation, models) into MLflow run %s", number, run_id)
    with deliver.from_folder(run_dir, run_id, uri) as shipment, tracking.ReopenedRun(uri, run_id) as run:
        deliver.log_deliverables(shipment, run, mlflow_cfg, signals.interruptible)
        run.set_tags({MADE: "made"})
    if ERROR in tags:  # from an earlier try, cut or failed: this one made them
        client.delete_tag(run_id, ERROR)


def _register(
    uri: str,
    study,
    trial: FrozenTrial,
    run_id: str,
    alias: str,
    config: DictConfig,
    objectives: list[str],
    mode,
    signals: Signals,
) -> str | None:
    """Register ``trial``'s model as a new version with ``alias`` (unless this run's model has a
    version already: the alias moves to it); None when there is no model to register."""
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
    client = MlflowClient(uri, registry_uri=uri)
    try:  # registered before (a resumed study, a Pareto front in a new order): the alias moves to it
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        existing = []  # no such model yet
    if existing:
        version = str(max(int(v.version) for v in existing))
        client.set_registered_model_alias(name, alias, version)
        return version
    signals.check()
    try:
        version = registry.register(uri, run_id, name, alias, tags)
    except UserError as e:
        log.warning("trial %d not registered as %s@%s: %s", trial.number, name, alias, one_line(e))
        return None
    log.info("trial %d registered as models:/%s/%s (alias: models:/%s@%s)", trial.number, name, version, name, alias)
    return version
