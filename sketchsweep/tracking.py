"""Everything MLflow: where the store is, what a run records, and how it ends.

The default store is ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/<experiment>/``: absolute paths, so jobs started from any folder (multirun,
SLURM) land in one store. ``mlflow.tracking_uri=...`` or ``$MLFLOW_TRACKING_URI`` override it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sketchsweep.config import PROJECT_ROOT

_log = logging.getLogger("sketchsweep")

# Set by the grid-multirun callback so jobs attach to the sweep's parent run.
PARENT_RUN_ENV = "SKETCHSWEEP_PARENT_RUN_ID"


def tracking_uri(configured: str | None) -> str:
    """``mlflow.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"


class TrackingError(ValueError):
    """An MLflow store that cannot be used (a tracking server that cannot be reached)."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_problem(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking server answers its /health endpoint, else what went wrong.

    Quick on purpose: MLflow's own client retries a refused connection for minutes."""
    import requests

    try:
        r = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None if r.status_code == 200 else f"/health answered HTTP {r.status_code}"


def _local_store_dir(uri: str) -> Path | None:
    """The folder of a SQLite database or file store; None for servers."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def setup_experiment(uri: str, experiment_name: str, artifact_root: str | None) -> str:
    """Point MLflow at ``uri`` and return the experiment id, creating the experiment if needed.

    For local stores the experiment gets an absolute artifact location: with a SQLite URI
    MLflow would otherwise put artifacts in ./mlruns of whatever folder the job runs in.
    """
    store_dir = _local_store_dir(uri)
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
    if is_server(uri) and (problem := server_problem(uri)):
        raise TrackingError(
            f"mlflow.tracking_uri={uri}: cannot reach the MLflow tracking server ({problem}); expected a running "
            "`mlflow server` at that address (README: Scaling out)"
        )
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is not None:
        return exp.experiment_id
    root = Path(artifact_root) if artifact_root else store_dir
    location = None
    if root is not None:
        location = (root.resolve() / re.sub(r"[^\w.-]+", "_", experiment_name)).as_uri()
    try:
        return client.create_experiment(experiment_name, artifact_location=location)
    except MlflowException:  # another job created it first
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 64}} -> {"model.width": 64}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_state(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Commit and dirty flag of the project, or nothing outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


def device_tags(device: torch.device) -> dict[str, str]:
    tags = {"device": str(device), "torch.version": torch.__version__}
    if device.type == "cuda":
        tags["device.name"] = torch.cuda.get_device_name(device)
        tags["cuda.version"] = str(torch.version.cuda)
        tags["cudnn.version"] = str(torch.backends.cudnn.version())
    else:
        tags["device.name"] = "cpu"
    return tags


def run_name(overrides: list[str]) -> str:
    """A readable name from the command-line overrides, leaving out paths and store settings."""
    skip = ("mlflow.", "hydra.", "data.root", "trainer.resume", "sweep.")
    parts = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(skip)]
    name = ",".join(parts) or "defaults"
    return name if len(name) <= 120 else name[:117] + "..."


class Run:
    """One MLflow run. Use as a context manager: it ends FINISHED on success, KILLED on
    Ctrl-C/SIGTERM and FAILED (with the traceback as ``error.txt``) on any other exception.

    On a tracking server, metrics and tags are buffered while the server cannot be reached and
    sent, in order and with their original timestamps, once it answers again: training goes on
    through an outage. Whatever is still unsent when the run ends (after MLflow's own retries,
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) is saved to ``mlflow_unsent.json`` in the run folder."""

    def __init__(self, uri: str, experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str]):
        self.uri, self.remote = uri, is_server(uri)
        self.client = MlflowClient(uri)
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
        self.id = self.run.info.run_id
        self.run_dir = Path(tags["sketchsweep.run_dir"]) if "sketchsweep.run_dir" in tags else None
        self.pending: list[tuple[list[Metric], list[RunTag]]] = []
        self.outage: float | None = None  # when the server stopped answering
        try:
            mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
        except BaseException:  # never leave an active run behind: the next trial in this process could not start
            mlflow.end_run("FAILED")
            raise

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self._flush(final=True):
                self._save_unsent()
        finally:  # a run is ended whatever happened to its last metrics
            try:
                self._end(exc_type, exc, tb)
            except Exception as e:
                if not self._unreachable(e):
                    raise
                # The result is in the run folder and the study; losing the server must not lose the trial.
                _log.error(
                    "MLflow run %s could not be ended at mlflow.tracking_uri=%s (server unreachable: %s); "
                    "it stays RUNNING",
                    *(self.id, self.uri, e),
                )

    def _end(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            mlflow.end_run("FINISHED")
            return
        if issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            mlflow.set_tag("sketchsweep.stopped", exc_type.__name__)
            mlflow.end_run("KILLED")
            return
        import traceback

        try:
            mlflow.log_text("".join(traceback.format_exception(exc_type, exc, tb)), "error.txt")
            mlflow.set_tag("sketchsweep.error", f"{exc_type.__name__}: {exc}"[:5000])
        finally:
            mlflow.end_run("FAILED")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending.append(([Metric(k, float(v), now, step) for k, v in metrics.items()], []))
        self._flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.pending.append(([], [RunTag(k, str(v)) for k, v in tags.items()]))
        self._flush()

    def _flush(self, final: bool = False) -> bool:
        """Send what is buffered; False (and a warning) when the server cannot be reached.

        Before the run's end a down server is detected by a quick /health probe instead of
        MLflow's retries, which would stall training for minutes."""
        if not self.pending:
            return True
        if self.remote and not final and server_problem(self.uri, timeout=2) is not None:
            self._down()
            return False
        try:
            while self.pending:
                metrics, tags = self.pending[0]
                self.client.log_batch(self.id, metrics=metrics, tags=tags)
                self.pending.pop(0)
        except Exception as e:
            if not self._unreachable(e):
                raise
            self._down()
            return False
        if self.outage is not None:
            _log.warning(
                "MLflow server at %s is back after %.0f s: buffered metrics and tags sent",
                *(self.uri, time.monotonic() - self.outage),
            )
            self.outage = None
        return True

    def _down(self) -> None:
        if self.outage is None:
            self.outage = time.monotonic()
            _log.warning(
                "MLflow server at %s (mlflow.tracking_uri) cannot be reached: training goes on, metrics are "
                "buffered and sent when it is back",
                self.uri,
            )

    def _unreachable(self, e: BaseException) -> bool:
        """Whether ``e`` came from a server that cannot be reached (then it is not a bug to raise)."""
        return self.remote and server_problem(self.uri, timeout=2) is not None

    def _save_unsent(self) -> None:
        import json

        n = sum(len(m) + len(t) for m, t in self.pending)
        rows = [
            {"metrics": [m.to_dictionary() for m in metrics], "tags": {t.key: t.value for t in tags}}
            for metrics, tags in self.pending
        ]
        where = "nowhere (no run folder)"
        if self.run_dir is not None:
            path = self.run_dir / "mlflow_unsent.json"
            path.write_text(json.dumps({"run_id": self.id, "tracking_uri": self.uri, "batches": rows}, indent=1))
            where = str(path)
        _log.error(
            "MLflow server at %s (mlflow.tracking_uri) still unreachable at the end of run %s: %d metric values "
            "and tags not sent, saved to %s",
            *(self.uri, self.id, n, where),
        )

    def _upload(self, what: str, upload) -> None:
        """Artifacts are not buffered: while the server is down they are skipped with one error
        (they stay in the run folder), instead of waiting out MLflow's retries for each."""
        if self.remote and (self.outage is not None or server_problem(self.uri, timeout=2) is not None):
            _log.error("MLflow server at %s unreachable: %s not uploaded (the run folder keeps it)", self.uri, what)
            return
        try:
            upload()
        except Exception as e:
            if not self._unreachable(e):
                raise
            _log.error("MLflow server at %s unreachable: %s not uploaded (the run folder keeps it)", self.uri, what)

    def log_files(self, paths: list[Path], artifact_path: str | None = None) -> None:
        def upload() -> None:
            for p in paths:
                if p.is_dir():
                    mlflow.log_artifacts(str(p), artifact_path=p.name)
                elif p.exists():
                    mlflow.log_artifact(str(p), artifact_path=artifact_path)

        self._upload(", ".join(p.name for p in paths), upload)

    def log_model(self, model: torch.nn.Module, example: np.ndarray) -> None:
        """The model as an MLflow pytorch model (pt2 format, dynamic batch from a >1 example).

        pip_requirements is given explicitly: inferring it takes ~15 s per run."""
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        self._upload(
            "the PyTorch model",
            lambda: mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=requirements),
        )

    def log_onnx(self, path: Path, example: np.ndarray) -> None:
        """An exported ``model.onnx`` as an MLflow onnx model (``onnx_model``), beside the PyTorch one."""
        import mlflow.onnx
        import onnx
        import onnxruntime

        requirements = [f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"]
        # MLflow's default lists CUDA first and warns wherever onnxruntime has no CUDA build (every
        # CPU machine): record the providers this machine's onnxruntime has, CUDA when it does.
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        proto = onnx.load(str(path))
        self._upload(
            "the ONNX model",
            lambda: mlflow.onnx.log_model(
                proto,
                name="onnx_model",
                input_example=example,
                signature=onnx_signature(proto),
                onnx_execution_providers=providers,
                pip_requirements=requirements,
            ),
        )


def onnx_signature(proto):
    """The MLflow signature of an ONNX model, read from its graph: named tensors with their dtypes
    and shapes (-1 for dynamic axes). Without it MLflow infers none for an ONNX model, and a model
    server parses JSON pixels as int64, which the uint8 input refuses."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    def specs(values) -> Schema:
        return Schema(
            [
                TensorSpec(
                    tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
                    tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim),
                    v.name,
                )
                for v in values
            ]
        )

    return ModelSignature(inputs=specs(proto.graph.input), outputs=specs(proto.graph.output))


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
        study_name: str,
        space: dict[str, Any],
        objectives: list[str],
        directions: list[str],
        study=None,
        created: bool = True,
    ):
        self.uri = tracking_uri(config.mlflow.tracking_uri)
        self.experiment_id = setup_experiment(self.uri, config.mlflow.experiment_name, config.mlflow.artifact_root)
        self.client = MlflowClient(self.uri)
        self.objectives = objectives
        run_id = None
        if study is not None:
            # Another worker is creating the study's parent run: wait for it (until that worker
            # has started trials, it has not finished setting up; give up after a minute).
            deadline = time.monotonic() + 60
            while (run_id := self._existing(study.user_attrs.get(self.ATTR))) is None and not created:
                if study.get_trials(deepcopy=False) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        if run_id is None:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`sketchsweep.study` = '{study_name}' and tags.`sketchsweep.role` = 'sweep'",
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
            else:
                tags = {
                    "sketchsweep.role": "sweep",
                    "sketchsweep.study": study_name,
                    "search_space": "; ".join(f"{k}: {v}" for k, v in space.items())[:5000],
                    "objectives": ",".join(f"{o} ({d})" for o, d in zip(objectives, directions, strict=True)),
                    **git_state(),
                }
                run_id = self.client.create_run(self.experiment_id, run_name=study_name, tags=tags).info.run_id
            if study is not None:
                study.set_user_attr(self.ATTR, run_id)
        self.run_id = run_id
        self.client.update_run(self.run_id, status="RUNNING")

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
        from optuna.trial import TrialState

        try:
            self._log_study(study)
        finally:
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                logging.getLogger("sketchsweep").info("other workers still run trials: parent run left RUNNING")
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
            self.client.set_tag(run.info.run_id, "sketchsweep.stopped", why)
            self.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            self.client.set_terminated(run.info.run_id, "KILLED")

    def _log_study(self, study) -> None:
        import json
        import tempfile

        import optuna
        from optuna.trial import TrialState

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
            self._plots(study, out, len(complete), optuna)
            for p in out.iterdir():
                self.client.log_artifact(self.run_id, str(p))

    def _plots(self, study, out: Path, n_complete: int, optuna) -> None:
        """Optuna's matplotlib plots as PNG; a plot the study cannot support yet is skipped."""
        import logging
        import warnings

        import matplotlib

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
                    logging.getLogger("sketchsweep").warning("plot %s skipped: %s", name, e)

    def _target(self, multi: bool) -> dict[str, Any]:
        # Multi-objective plots that show one value need to be told which (the first objective).
        return {"target": lambda t: t.values[0], "target_name": self.objectives[0]} if multi else {}


try:
    from hydra.experimental.callback import Callback
except ImportError:  # the core runs without Hydra; this callback is only used through it
    Callback = object  # type: ignore[misc,assignment]


class MultirunParent(Callback):
    """A Hydra callback: one MLflow parent run for a plain multirun (Hydra's basic sweeper), so a
    grid's jobs are grouped like an Optuna sweep's trials. The Optuna sweeper makes its own."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.run = None
        if "sketchsweep_optuna" in str(config.hydra.sweeper.get("_target_", "")):
            return
        uri = tracking_uri(config.mlflow.tracking_uri)
        experiment_id = setup_experiment(uri, config.mlflow.experiment_name, config.mlflow.artifact_root)
        self.client = MlflowClient(uri)
        name = f"multirun {' '.join(config.hydra.overrides.task)}"[:250]
        tags = {"sketchsweep.role": "multirun", "sketchsweep.sweep_dir": str(config.hydra.sweep.dir), **git_state()}
        self.run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        os.environ[PARENT_RUN_ENV] = self.run.info.run_id

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self.run is not None:
            self.client.set_terminated(self.run.info.run_id, "FINISHED")
            os.environ.pop(PARENT_RUN_ENV, None)
