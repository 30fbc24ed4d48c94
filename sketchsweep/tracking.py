"""MLflow while training: where the store is, what a run records, and how it ends.

The default store is ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/<experiment>/``: absolute paths, so jobs started from any folder (multirun,
SLURM) land in one store. ``mlflow.tracking_uri=...`` or ``$MLFLOW_TRACKING_URI`` override it.
A sweep's parent run is ``sketchsweep.sweep.parent``; reading runs back is ``sketchsweep.store``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from sketchsweep import credentials
from sketchsweep.cli import UserError, one_line
from sketchsweep.localstore import artifact_problem, creation_lock, sqlite_file, write_problem
from sketchsweep.outbox import Outbox, is_server, server_problem
from sketchsweep.paths import MLRUNS, PROJECT_ROOT

log = logging.getLogger("sketchsweep")

# MLflow's INFO lines ("Validating input example ...", "Creating initial MLflow database tables")
# are chatter on our console; its warnings still show, and MLFLOW_LOGGING_LEVEL=INFO brings them back.
if "MLFLOW_LOGGING_LEVEL" not in os.environ:
    logging.getLogger("mlflow").setLevel(logging.WARNING)


WEIGHT_SUFFIXES = (".pth", ".pt", ".onnx")  # hard-linked into a local artifact store (Run._link)


class TrackingError(UserError):
    """An MLflow store that cannot be used (a tracking server that cannot be reached)."""


@contextlib.contextmanager
def env_defaults(**values: str) -> Iterator[None]:
    """MLflow settings (environment variables it reads on each call) for the duration of a block:
    the user's own settings win, and the environment is restored afterwards."""
    added = [key for key in values if key not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def tracking_uri(configured: str | None) -> str:
    """``mlflow.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite store.
    A password in it stays out of what is logged: a server's goes to MLflow through
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (the URI returned has none), a database's is shared
    with the jobs this process launches (``sketchsweep.credentials``)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS / 'mlflow.db'}"
    if is_server(uri):
        return credentials.server_uri(uri)
    uri = credentials.reveal(uri, "mlflow.tracking_uri")
    credentials.share(uri)
    return uri


def local_store_dir(uri: str) -> Path | None:
    """The folder of a SQLite database or file store; None for servers."""
    if (db := sqlite_file(uri)) is not None:
        return db.parent
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def artifact_location(store_dir: Path | None, artifact_root: str | None, experiment_name: str) -> str | None:
    """An experiment's artifact folder for a local store, as an absolute URI: with a SQLite URI
    MLflow would otherwise put artifacts in ./mlruns of whatever folder the job runs in."""
    root = Path(artifact_root) if artifact_root else store_dir
    return None if root is None else (root.resolve() / re.sub(r"[^\w.-]+", "_", experiment_name)).as_uri()


_experiments: dict[tuple[str, str, str | None], str] = {}  # set up in this process: trials of a sweep share it


def setup_experiment(uri: str, experiment_name: str, artifact_root: str | None) -> str:
    """Point MLflow at ``uri`` and return the experiment id, creating the experiment if needed.
    Local folders are checked first, the store's and the artifacts', so that a run that could not
    keep its results does not start. Once per process and experiment: a sweep's trials reuse it."""
    key = (uri, experiment_name, artifact_root)
    if key in _experiments:
        mlflow.set_tracking_uri(uri)
        return _experiments[key]
    _experiments[key] = experiment_id = _setup_experiment(uri, experiment_name, artifact_root)
    return experiment_id


def _setup_experiment(uri: str, experiment_name: str, artifact_root: str | None) -> str:
    store_dir = local_store_dir(uri)
    if store_dir is not None and (problem := write_problem(store_dir)):
        raise TrackingError(
            f"mlflow.tracking_uri={uri}: cannot create files in the store's folder {store_dir} ({problem}); "
            "expected a folder this user can write (SQLite keeps its journal beside the database)"
        )
    if is_server(uri) and (problem := server_problem(uri)):
        raise TrackingError(
            f"mlflow.tracking_uri={uri}: cannot reach the MLflow tracking server ({problem}); expected a running "
            "`mlflow server` at that address (README: Scaling out)"
        )
    mlflow.set_tracking_uri(uri)
    with creation_lock(uri):  # the first contact creates a fresh store: one process at a time
        client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name)
    location = artifact_location(store_dir, artifact_root, experiment_name)
    actual = location if exp is None else exp.artifact_location
    if problem := artifact_problem(actual, artifact_root, experiment_name, created=exp is not None):
        raise TrackingError(problem)
    if exp is not None:
        if artifact_root and actual != location:
            log.warning(
                "experiment '%s' keeps its artifacts in %s, not under mlflow.artifact_root=%s: an experiment's "
                "artifact location is fixed when it is created, so its own is used (a new mlflow.experiment_name "
                "would use the configured one)",
                *(experiment_name, exp.artifact_location, artifact_root),
            )
        return exp.experiment_id
    try:
        return client.create_experiment(experiment_name, artifact_location=location)
    except MlflowException:  # another job created it first
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            raise
        return exp.experiment_id


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


UI = "http://127.0.0.1:5000"  # where `make ui` serves a local store


def run_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The run's (or experiment's) page in MLflow's classic runs view: the server's own address,
    or ``make ui``'s for a local store. (Without ``workflowType`` MLflow 3 opens its GenAI overview.)"""
    base = credentials.hide_passwords(uri).rstrip("/") if is_server(uri) else UI
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?workflowType=machine_learning"


def run_name(overrides: Iterable[str]) -> str:
    """A readable name from the command-line overrides, leaving out paths and store settings."""
    skip = ("mlflow.", "hydra.", "data.root", "trainer.resume", "sweep.")
    parts = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(skip)]
    name = ",".join(parts) or "defaults"
    return name if len(name) <= 120 else name[:117] + "..."


class Run:
    """One MLflow run, started when its ``with`` block is entered (inside the signal handling that
    keeps its writes whole). It ends FINISHED on success, KILLED on Ctrl-C/SIGTERM and FAILED
    (with the traceback as ``error.txt``) on any other exception. Metrics and tags go through an
    ``Outbox``, so a tracking server's outage does not stop training; artifacts are skipped while
    it is down (the run folder keeps them)."""

    def __init__(self, uri: str, experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str]):
        self.uri, self.experiment_id, self.name, self.params, self.tags = uri, experiment_id, name, params, tags
        self.run_dir = Path(tags["sketchsweep.run_dir"]) if "sketchsweep.run_dir" in tags else None

    def __enter__(self) -> Run:
        self.run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self.name, tags=self.tags)
        self.id = self.run.info.run_id
        self.outbox = Outbox(MlflowClient(self.uri), self.id, self.uri)
        try:
            mlflow.log_params({k: ("null" if v is None else v) for k, v in self.params.items()})
        except BaseException:  # never leave an active run behind: the next trial in this process could not start
            mlflow.end_run("FAILED")
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.outbox.flush(final=True):
                self.outbox.save_unsent(self.run_dir)
        finally:  # a run is ended whatever happened to its last metrics
            try:
                self._end(exc_type, exc, tb)
            except Exception as e:
                if not self.outbox.unreachable():
                    raise
                # The result is in the run folder and the study; losing the server must not lose the trial.
                log.error(
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
        try:  # the reason first: when the artifact store is what failed, error.txt cannot be written
            mlflow.set_tag("sketchsweep.error", credentials.hide_passwords(f"{exc_type.__name__}: {exc}")[:5000])
            try:
                mlflow.log_text(
                    credentials.hide_passwords("".join(traceback.format_exception(exc_type, exc, tb))), "error.txt"
                )
            except Exception as e:  # the run still ends FAILED with its reason, and the error goes on up
                log.error(
                    "MLflow run %s failed: %s; its traceback could not be written as error.txt (%s)",
                    *(self.id, one_line(exc), one_line(e)),
                )
        finally:
            mlflow.end_run("FAILED")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.outbox.put([Metric(k, float(v), now, step) for k, v in metrics.items()], [])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.outbox.put([], [RunTag(k, str(v)) for k, v in tags.items()])

    def _upload(self, what: str, upload: Callable[[], Any]) -> None:
        """Artifacts are not buffered: while the server is down they are skipped with one error
        each (they stay in the run folder), instead of waiting out MLflow's retries for each."""
        if self.outbox.outage is None and not self.outbox.unreachable():
            try:
                upload()
                return
            except Exception as e:
                if not self.outbox.unreachable():  # one line for the console and the run's error tag
                    where = f"; the run folder {self.run_dir} keeps it" if self.run_dir else ""
                    raise TrackingError(
                        f"MLflow could not store {what} in {self.run.info.artifact_uri} ({one_line(e)}){where}"
                    ) from e
        log.error("MLflow server at %s unreachable: %s not uploaded (the run folder keeps it)", self.uri, what)

    def log_files(self, paths: list[Path], artifact_path: str | None = None) -> None:
        def upload() -> None:
            for p in paths:
                if p.is_dir():
                    mlflow.log_artifacts(str(p), artifact_path=p.name)
                elif p.exists() and not self._link(p, artifact_path):
                    mlflow.log_artifact(str(p), artifact_path=artifact_path)

        self._upload(", ".join(p.name for p in paths), upload)

    def _link(self, path: Path, artifact_path: str | None) -> bool:
        """Weights in a local artifact store: a hard link to the run folder's file rather than a
        second copy (its files are replaced by rename, never rewritten, so the artifact keeps its
        content). False where that cannot be done: the file is then copied or uploaded."""
        uri = self.run.info.artifact_uri
        if path.suffix not in WEIGHT_SUFFIXES or urlparse(uri).scheme not in ("", "file"):
            return False
        folder = Path(local_file_uri_to_path(uri)) / (artifact_path or "")  # as MLflow's own copy reads it
        tmp = folder / f".{path.name}.{os.getpid()}.link"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, folder / path.name)
            tmp.unlink(missing_ok=True)  # still there when the artifact already was this very file
        except OSError:  # another file system, or links not allowed: copied instead
            tmp.unlink(missing_ok=True)
            return False
        return True

    def log_model(self, model: torch.nn.Module, example: np.ndarray) -> None:
        """The model as an MLflow pytorch model (pt2 format, dynamic batch from a >1 example).

        pip_requirements is given explicitly: inferring it takes ~15 s per run."""
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        self._upload(
            "the PyTorch model",
            lambda: mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=requirements),
        )

    def log_onnx(self, path: Path, example: np.ndarray) -> None:
        """An exported ``model.onnx`` as the MLflow model ``onnx_model``: ``served_model.py`` (a
        model from code, the .onnx its artifact), so that a model server answers class names."""
        import mlflow.pyfunc
        import onnxruntime

        requirements = [f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"]  # not inferred: slow

        def upload() -> None:
            # MLflow's copies of the .onnx would draw progress bars ("\r") on the console
            with env_defaults(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
                mlflow.pyfunc.log_model(
                    name="onnx_model",
                    python_model=str(Path(__file__).with_name("served_model.py")),
                    artifacts={"onnx": str(path)},
                    input_example=example,
                    signature=onnx_signature(),
                    pip_requirements=requirements,
                )

        self._upload("the ONNX model", upload)

    def say_where(self, run_dir: Path, experiment_name: str, say: Callable[..., None]) -> None:
        """Where the run's files and MLflow run are, and its link (with how to start the UI for a local store)."""
        say("run folder: %s", run_dir)
        shown = credentials.hide_passwords(self.uri)
        say("MLflow run %s in experiment '%s' at %s", self.id, experiment_name, shown)
        ui = "" if is_server(self.uri) else f"  (start the UI first: make ui, or mlflow ui --backend-store-uri {shown})"
        say("open it: %s%s", run_url(self.uri, self.experiment_id, self.id), ui)


class ReopenedRun(Run):
    """A finished run, opened again to add what is made after it ended (a sweep's deliverables for
    its best trial, a completed trial). It ends FINISHED again with its original end time, whatever
    happens (a run cut while it was open before is FINISHED too: its trial completed); what went
    wrong is its tag ``sketchsweep.deliverables_error``."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.reopen_id = run_id
        info = MlflowClient(uri).get_run(run_id)
        self.ended = info.info.end_time
        super().__init__(uri, info.info.experiment_id, info.info.run_name, {}, dict(info.data.tags))

    def __enter__(self) -> Run:
        self.run = mlflow.start_run(run_id=self.reopen_id)
        self.id = self.run.info.run_id
        self.outbox = Outbox(MlflowClient(self.uri), self.id, self.uri)
        return self

    def _end(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                error = credentials.hide_passwords(f"{exc_type.__name__}: {exc}")[:5000]
                mlflow.set_tag("sketchsweep.deliverables_error", error)
        finally:
            mlflow.end_run("FINISHED")
            MlflowClient(self.uri).set_terminated(self.id, "FINISHED", end_time=self.ended)


def onnx_signature():
    """The served model's signature: the export's input (uint8 ``images``: without it a model
    server would parse JSON pixels as int64), one record per drawing out, and the ``top_k`` param."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema, TensorSpec

    from sketchsweep.onnx_model import INPUT_NAME

    top = Array(Object([Property("label", "string"), Property("probability", "double")]))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28), INPUT_NAME)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"), ColSpec(top, "top_k")]),
        params=ParamSchema([ParamSpec("top_k", "long", 3)]),
    )
