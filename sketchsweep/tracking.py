"""MLflow while training: where the store is, what a run records, and how it ends.

The default store is ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/<experiment>/``: absolute paths, so jobs started from any folder (multirun,
SLURM) land in one store. ``mlflow.tracking_uri=...`` or ``$MLFLOW_TRACKING_URI`` override it.
A sweep's parent run is ``sketchsweep.sweep.parent``; reading runs back is ``sketchsweep.store``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import requests
import torch
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sketchsweep import credentials
from sketchsweep.cli import UserError, one_line
from sketchsweep.localstore import artifact_problem, creation_lock, sqlite_file, write_problem
from sketchsweep.paths import MLRUNS, PROJECT_ROOT

log = logging.getLogger("sketchsweep")


class TrackingError(UserError):
    """An MLflow store that cannot be used (a tracking server that cannot be reached)."""


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


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_problem(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking server answers its /health endpoint, else what went wrong.

    Quick on purpose: MLflow's own client retries a refused connection for minutes."""
    try:
        r = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None if r.status_code == 200 else f"/health answered HTTP {r.status_code}"


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


def setup_experiment(uri: str, experiment_name: str, artifact_root: str | None) -> str:
    """Point MLflow at ``uri`` and return the experiment id, creating the experiment if needed.
    Local folders are checked first, the store's and the artifacts', so that a run that could not
    keep its results does not start."""
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


def run_name(overrides: Iterable[str]) -> str:
    """A readable name from the command-line overrides, leaving out paths and store settings."""
    skip = ("mlflow.", "hydra.", "data.root", "trainer.resume", "sweep.")
    parts = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(skip)]
    name = ",".join(parts) or "defaults"
    return name if len(name) <= 120 else name[:117] + "..."


class Outbox:
    """A run's metrics and tags on their way to the store. On a tracking server they wait, in order
    and with their original timestamps, while the server cannot be reached, and go once it answers:
    training goes on through an outage. A down server is detected by a quick /health probe, not by
    MLflow's retries, which would stall training for minutes."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri, self.remote = client, run_id, uri, is_server(uri)
        self.pending: list[tuple[list[Metric], list[RunTag]]] = []
        self.outage: float | None = None  # when the server stopped answering

    def put(self, metrics: list[Metric], tags: list[RunTag]) -> None:
        self.pending.append((metrics, tags))
        self.flush()

    def flush(self, final: bool = False) -> bool:
        """Send what is waiting; False (and one warning per outage) while the server cannot be reached.
        ``final``: the run is ending, so MLflow's own retries get their chance."""
        if not self.pending:
            return True
        if self.remote and not final and server_problem(self.uri, timeout=2) is not None:
            self._down()
            return False
        try:
            while self.pending:
                metrics, tags = self.pending[0]
                self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
                self.pending.pop(0)
        except Exception:
            if not self.unreachable():
                raise
            self._down()
            return False
        if self.outage is not None:
            log.warning(
                "MLflow server at %s is back after %.0f s: buffered metrics and tags sent",
                *(self.uri, time.monotonic() - self.outage),
            )
            self.outage = None
        return True

    def _down(self) -> None:
        if self.outage is None:
            self.outage = time.monotonic()
            log.warning(
                "MLflow server at %s (mlflow.tracking_uri) cannot be reached: training goes on, metrics are "
                "buffered and sent when it is back",
                self.uri,
            )

    def unreachable(self) -> bool:
        """Whether the store is a server that cannot be reached now (then an error from it is not a bug)."""
        return self.remote and server_problem(self.uri, timeout=2) is not None

    def save_unsent(self, run_dir: Path | None) -> None:
        """What is still waiting at the end of the run goes to ``mlflow_unsent.json`` in the run folder."""
        n = sum(len(m) + len(t) for m, t in self.pending)
        rows = [
            {"metrics": [m.to_dictionary() for m in metrics], "tags": {t.key: t.value for t in tags}}
            for metrics, tags in self.pending
        ]
        where = "nowhere (no run folder)"
        if run_dir is not None:
            path = run_dir / "mlflow_unsent.json"
            path.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri, "batches": rows}, indent=1))
            where = str(path)
        log.error(
            "MLflow server at %s (mlflow.tracking_uri) still unreachable at the end of run %s: %d metric values "
            "and tags not sent, saved to %s",
            *(self.uri, self.run_id, n, where),
        )


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
