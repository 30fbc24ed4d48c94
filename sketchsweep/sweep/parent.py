"""The MLflow parent run of a sweep, so its trials (or a grid's jobs) are grouped in the UI."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from sketchsweep import store, tracking
from sketchsweep.cli import one_line, redact
from sketchsweep.sweep import report
from sketchsweep.sweep.space import Fixed

log = logging.getLogger("sketchsweep")

# Set by the grid-multirun callback so jobs attach to the sweep's parent run.
PARENT_RUN_ENV = "SKETCHSWEEP_PARENT_RUN_ID"
PLOTS_EVERY_S = 60.0  # the parent's PNG plots are rendered at most this often while a sweep runs
LIGHTEST_BLUE = 0.4  # where the parallel-coordinates colormap starts on "Blues" (0: near-white)
MAX_TAG = 8000  # MLflow's limit on a tag's value


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
        fixed: Fixed | None = None,
    ):
        """``fixed``: the sweep's fixed overrides, for the ``best_command`` tag (None: no such tag)."""
        self.uri = tracking.tracking_uri(config.mlflow.tracking_uri)
        self.experiment_id = tracking.setup_experiment(
            self.uri, config.mlflow.experiment_name, config.mlflow.artifact_root
        )
        self.client = MlflowClient(self.uri)
        self.objectives, self.directions, self.fixed = objectives, directions, fixed
        self._plotted = time.monotonic()  # the first plots a minute in: a short sweep renders them once, at its end
        self._best: list[int] | None = None  # the best trial(s) the tags show
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

    def end(self, study: optuna.Study, status: str) -> None:
        """Log the study's result (best trial or Pareto front, trials table, plots) and close,
        unless other workers still run trials: the last one to stop closes the parent."""
        try:
            self.refresh(study, plots=True)
        finally:
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                log.info("other workers still run trials: parent run left RUNNING")
            else:
                self.client.set_terminated(self.run_id, status)

    def end_lost_trial(self, study_name: str, number: int, why: str) -> None:
        """End the MLflow run of a trial whose worker died or whose job was lost (it would stay
        RUNNING forever); one its job ended KILLED itself (a signal) is told ``why`` too."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`optuna.study` = '{study_name}' and tags.`optuna.trial` = '{number}'",
        )
        for run in runs:
            if run.info.status in ("RUNNING", "KILLED"):
                self.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            if run.info.status == "RUNNING":
                store.end_gone_run(self.client, run.info.run_id, why)
            elif run.info.status == "KILLED":
                self.client.set_tag(run.info.run_id, store.STOPPED, why)

    def refresh(self, study: optuna.Study, plots: bool | None = None) -> None:
        """Show the study's progress on the parent run, after every trial: trial counts, the best
        trial (``study_best_<objective>``, tags), ``trials.csv`` and ``best_trials.json``, which
        cost milliseconds; the PNG plots (a second or two) at most every ``PLOTS_EVERY_S``
        seconds, or now with ``plots=True``. While the sweep runs (``plots`` not True) a store
        that fails to take them is a warning: the next trial's refresh sends them again."""
        try:
            self._refresh(study, plots if plots is not None else time.monotonic() - self._plotted >= PLOTS_EVERY_S)
        except (MlflowException, OSError) as e:
            if plots:
                raise
            log.warning("sweep's parent run not updated this time: %s", one_line(e))

    def _refresh(self, study: optuna.Study, plots: bool) -> None:
        trials = study.get_trials(deepcopy=False)
        best = report.champions(study)
        self._log_progress(study, trials, best)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            study.trials_dataframe().to_csv(out / "trials.csv", index=False)
            summary = [{"number": t.number, "values": t.values, "params": t.params} for t in best]
            (out / "best_trials.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
            if plots:
                complete = sum(t.state == TrialState.COMPLETE for t in trials)
                render_plots(study, self.objectives, self.directions, out, complete)
                self._plotted = time.monotonic()
            self.client.log_artifacts(self.run_id, str(out))

    def _log_progress(self, study: optuna.Study, trials: list[FrozenTrial], best: list[FrozenTrial]) -> None:
        """Counts and the best trial in one write; the best trial's tags only when it changed."""
        now, step = int(time.time() * 1000), sum(t.state.is_finished() for t in trials)
        counts = Counter(t.state for t in trials)
        metrics = [Metric(f"trials_{s.name.lower()}", counts[s], now, step) for s in TrialState]
        tags: dict[str, str] = {}
        if best and len(study.directions) == 1:
            name = report.metric_names(study, self.objectives)[0]
            metrics.append(Metric(f"study_best_{name}", best[0].value, now, step))
        numbers = [t.number for t in best]
        if best and numbers != self._best:
            tags = self._best_tags(best)
        self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        self._best = numbers  # once sent: a failed write sends them again next time

    def _best_tags(self, best: list[FrozenTrial]) -> dict[str, str]:
        """The best trial (the first on the Pareto front, best on the first objective): its number,
        params, MLflow run and the command that retrains it (when the sweep's fixed overrides are known)."""
        tags = {"best_trial": str(best[0].number)} | {
            f"best.{k.lstrip('+~')}": str(v) for k, v in best[0].params.items()
        }
        if run_id := best[0].user_attrs.get(report.RUN_ID_ATTR):
            tags["best_run_id"] = run_id
        if len(best) > 1:
            tags["pareto_trials"] = ",".join(str(t.number) for t in best)[:MAX_TAG]
        if self.fixed is not None:
            command = report.best_command(best[0].params, self.fixed)
            tags["best_command"] = command if len(command) <= MAX_TAG else "(too long for a tag: see best.yaml)"
        return tags


def render_plots(study: optuna.Study, objectives: list[str], directions: list[str], out: Path, n_complete: int) -> None:
    """Optuna's matplotlib plots as PNG in ``out``; a plot the study cannot support yet is skipped."""
    import matplotlib  # only when plots are due: pyplot is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    multi = len(directions) > 1
    # Multi-objective plots that show one value need to be told which (the first objective).
    target: dict[str, Any] = {"target": lambda t: t.values[0], "target_name": objectives[0]} if multi else {}
    plots = {"parallel_coordinates": lambda: parallel_coordinates(study, objectives, directions)}
    if multi:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=objectives)
    else:
        plots["optimization_history"] = lambda: vis.plot_optimization_history(study)
    if n_complete >= 2:
        plots["param_importances"] = lambda: vis.plot_param_importances(study, **target)
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


def parallel_coordinates(study: optuna.Study, objectives: list[str], directions: list[str]):
    """Optuna's parallel-coordinates plot (matplotlib Axes), coloured by the first objective from
    mid blue (worst) to dark blue (best). Optuna's own colormap starts at near-white, which hides
    the worst trials, and with ``target`` (several objectives) is reversed, which hides the best."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from optuna.visualization import matplotlib as vis

    multi = len(directions) > 1
    target: dict[str, Any] = {"target": lambda t: t.values[0], "target_name": objectives[0]} if multi else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        ax = vis.plot_parallel_coordinate(study, **target)
    colors = plt.get_cmap("Blues")(np.linspace(LIGHTEST_BLUE, 1.0, 256))
    cmap = ListedColormap(colors if directions[0] == "maximize" else colors[::-1], name="sketchsweep_blues")
    for lines in ax.collections:
        if isinstance(lines, LineCollection):
            lines.set_cmap(cmap)  # the colorbar follows its mappable
    return ax


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
