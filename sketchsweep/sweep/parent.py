"""The MLflow parent run of a sweep, so its trials (or a grid's jobs) are grouped in the UI."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from hydra.experimental.callback import Callback
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sketchsweep import store, tracking
from sketchsweep.cli import redact

log = logging.getLogger("sketchsweep")

# Set by the grid-multirun callback so jobs attach to the sweep's parent run.
PARENT_RUN_ENV = "SKETCHSWEEP_PARENT_RUN_ID"


class SweepRun:
    """The MLflow parent run of a sweep; every trial's run is its child (``mlflow.parentRunId``).

    One per study, shared by all its workers and found again when a sweep is resumed: its id is
    kept in the study (user attribute ``sketchsweep.mlflow_parent_run``), set by the worker that
    created the study, which the database makes exactly one; failing that, it is found by the
    study's name. Made with ``MlflowClient`` rather than ``mlflow.start_run``: trials run in this
    process start their own (fluent) runs, which must not nest under an active one."""

    ATTR = "sketchsweep.mlflow_parent_run"

    def __init__(
        self,
        config,
        study: optuna.Study,
        space: dict[str, Any],
        objectives: list[str],
        directions: list[str],
        created: bool,
    ):
        self.uri = tracking.tracking_uri(config.mlflow.tracking_uri)
        self.experiment_id = tracking.setup_experiment(
            self.uri, config.mlflow.experiment_name, config.mlflow.artifact_root
        )
        self.client = MlflowClient(self.uri)
        self.objectives = objectives
        self.run_id = self._of_study(study, created)
        if self.run_id is None:
            self.run_id = self._find_or_create(study.study_name, space, directions)
            study.set_user_attr(self.ATTR, self.run_id)
        self.client.update_run(self.run_id, status="RUNNING")

    def _of_study(self, study: optuna.Study, created: bool) -> str | None:
        """The parent run the study names. Another worker may still be creating it: wait for it
        (until that worker has started trials it has not finished setting up; give up after a minute)."""
        deadline = time.monotonic() + 60
        while (run_id := self._existing(study.user_attrs.get(self.ATTR))) is None and not created:
            if study.get_trials(deepcopy=False) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return run_id

    def _find_or_create(self, study_name: str, space: dict[str, Any], directions: list[str]) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`sketchsweep.study` = '{study_name}' and tags.`sketchsweep.role` = 'sweep'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        tags = {
            "sketchsweep.role": "sweep",
            "sketchsweep.study": study_name,
            "search_space": "; ".join(f"{k}: {v}" for k, v in space.items())[:5000],
            "objectives": ",".join(f"{o} ({d})" for o, d in zip(self.objectives, directions, strict=True)),
            **tracking.git_state(),
        }
        return self.client.create_run(self.experiment_id, run_name=study_name, tags=tags).info.run_id

    def _existing(self, run_id: str | None) -> str | None:
        """``run_id`` if it is a live run in this store (a study may move to another tracking server)."""
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return run_id if run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id else None

    def end(self, study, status: str) -> None:
        """Log the study's result (best trial or Pareto front, trials table, plots) and close,
        unless other workers still run trials: the last one to stop closes the parent."""
        try:
            self._log_study(study)
        finally:
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                log.info("other workers still run trials: parent run left RUNNING")
            else:
                self.client.set_terminated(self.run_id, status)

    def end_lost_trial(self, study_name: str, number: int, why: str) -> None:
        """End the MLflow run of a trial whose worker died (it would stay RUNNING forever)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`optuna.study` = '{study_name}' and tags.`optuna.trial` = '{number}' "
            "and attributes.status = 'RUNNING'",
        )
        for run in runs:
            self.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            store.end_gone_run(self.client, run.info.run_id, why)

    def _log_study(self, study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
        for k, v in counts.items():
            self.client.log_metric(self.run_id, f"trials_{k}", v)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            study.trials_dataframe().to_csv(out / "trials.csv", index=False)
            best = []
            if complete:
                if len(study.directions) == 1:
                    best = [study.best_trial]
                    self.client.log_metric(self.run_id, f"best_{self.objectives[0]}", study.best_value)
                else:  # no single best: the Pareto front goes to best_trials.json
                    best = study.best_trials
                self.client.set_tag(self.run_id, "best_trial", str(best[0].number))
                for k, v in best[0].params.items():
                    self.client.set_tag(self.run_id, f"best.{k}", str(v))
            summary = [{"number": t.number, "values": t.values, "params": t.params} for t in best]
            (out / "best_trials.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
            self._plots(study, out, len(complete))
            for p in out.iterdir():
                self.client.log_artifact(self.run_id, str(p))

    def _plots(self, study, out: Path, n_complete: int) -> None:
        """Optuna's matplotlib plots as PNG; a plot the study cannot support yet is skipped."""
        import matplotlib  # only when a study ends: pyplot is slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as vis

        multi = len(study.directions) > 1
        plots = {"parallel_coordinates": lambda: vis.plot_parallel_coordinate(study, **self._target(multi))}
        if multi:
            plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=self.objectives)
        else:
            plots["optimization_history"] = lambda: vis.plot_optimization_history(study)
        if n_complete >= 2:
            plots["param_importances"] = lambda: vis.plot_param_importances(study, **self._target(multi))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            for name, make in plots.items():
                try:
                    ax = make()
                    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                    fig.tight_layout()
                    fig.savefig(out / f"{name}.png", dpi=100)
                    plt.close(fig)
                except Exception as e:  # e.g. importances when every trial has the same params
                    log.warning("plot %s skipped: %s", name, e)

    def _target(self, multi: bool) -> dict[str, Any]:
        # Multi-objective plots that show one value need to be told which (the first objective).
        return {"target": lambda t: t.values[0], "target_name": self.objectives[0]} if multi else {}


class MultirunParent(Callback):
    """A Hydra callback: one MLflow parent run for a plain multirun (Hydra's basic sweeper), so a
    grid's jobs are grouped like an Optuna sweep's trials. The Optuna sweeper makes its own."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.run = None
        if "sketchsweep_optuna" in str(config.hydra.sweeper.get("_target_", "")):
            return
        uri = tracking.tracking_uri(config.mlflow.tracking_uri)
        experiment_id = tracking.setup_experiment(uri, config.mlflow.experiment_name, config.mlflow.artifact_root)
        self.client = MlflowClient(uri)
        name = redact(f"multirun {' '.join(config.hydra.overrides.task)}")[:250]  # the overrides as typed
        tags = {"sketchsweep.role": "multirun", "sketchsweep.sweep_dir": str(config.hydra.sweep.dir)}
        tags |= tracking.git_state()
        self.run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        os.environ[PARENT_RUN_ENV] = self.run.info.run_id

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self.run is not None:
            self.client.set_terminated(self.run.info.run_id, "FINISHED")
            os.environ.pop(PARENT_RUN_ENV, None)
