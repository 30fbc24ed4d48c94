"""Everything MLflow: where the store is, what a run records, and how it ends.

The default store is ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/<experiment>/``: absolute paths, so jobs started from any folder (multirun,
SLURM) land in one store. ``mlflow.tracking_uri=...`` or ``$MLFLOW_TRACKING_URI`` override it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sketchsweep.config import PROJECT_ROOT


def tracking_uri(configured: str | None) -> str:
    """``mlflow.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"


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
    skip = ("mlflow.", "hydra.", "data.root", "trainer.resume")
    parts = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(skip)]
    name = ",".join(parts) or "defaults"
    return name if len(name) <= 120 else name[:117] + "..."


class Run:
    """One MLflow run. Use as a context manager: it ends FINISHED on success, KILLED on
    Ctrl-C/SIGTERM and FAILED (with the traceback as ``error.txt``) on any other exception."""

    def __init__(self, uri: str, experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str]):
        self.client = MlflowClient(uri)
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
        self.id = self.run.info.run_id
        mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
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
        mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        mlflow.set_tags(tags)

    def log_files(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path=p.name)
            elif p.exists():
                mlflow.log_artifact(str(p), artifact_path=artifact_path)

    def log_model(self, model: torch.nn.Module, example: np.ndarray) -> None:
        """The model as an MLflow pytorch model (pt2 format, dynamic batch from a >1 example).

        pip_requirements is given explicitly: inferring it takes ~15 s per run."""
        mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        )
