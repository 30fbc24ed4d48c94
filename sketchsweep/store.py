"""The MLflow store after training: a run's files read back (``runs:/``, ``models:/``), an
evaluation added to a finished run, and the doctor's check that the store is reachable and
writable (a throwaway run written, read back and deleted for good)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import mlflow
from mlflow.entities import Metric, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from sketchsweep.cli import one_line
from sketchsweep.localstore import creation_lock, write_problem
from sketchsweep.modelref import ModelRef, ModelRefError
from sketchsweep.tracking import (
    TrackingError,
    artifact_location,
    env_defaults,
    is_server,
    local_store_dir,
    server_problem,
    tracking_uri,
)

CHECK_EXPERIMENT = "sketchsweep-doctor"
STOPPED = "sketchsweep.stopped"  # the tag saying why a run was ended KILLED


def log_to_run(run_id: str, uri: str, folder: Path, artifact_path: str, metrics: dict[str, float]) -> None:
    """Add files and metrics (step 0) to an existing run, e.g. an evaluation done after training;
    a run the store cannot take them for is a ``TrackingError`` naming it."""
    client = MlflowClient(uri)
    try:
        client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    except MlflowException as e:
        raise TrackingError(f"cannot log to MLflow run {run_id} at {uri}: {one_line(e)}") from None


def registered_run(client: MlflowClient, ref: ModelRef) -> str:
    """The run that logged the Model Registry version ``ref`` names (models:/<name>/<version|@alias>)."""
    try:
        if ref.alias is not None:
            version = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            version = client.get_model_version(ref.name, ref.version)
    except MlflowException as e:
        raise ModelRefError(f"{ref.text}: not in the Model Registry at {client.tracking_uri} ({one_line(e)})") from None
    if not version.run_id:
        raise ModelRefError(
            f"{ref.text}: version {version.version} was registered from {version.source}, not from a training run; "
            "sketchsweep reads the config, classes and weights of the run that logged it"
        )
    return version.run_id


def fetch_run_files(ref: ModelRef, names: Iterable[str], dst: Path, uri: str | None = None) -> str:
    """Download ``names`` from the artifacts of the run a ``runs:/`` or ``models:/`` reference
    points at (in the store at ``uri``; None: the one ``$MLFLOW_TRACKING_URI`` names, default the
    project's) into ``dst``; returns the run id."""
    uri = uri or tracking_uri(None)
    run_id = ref.run_id or registered_run(MlflowClient(uri), ref)
    for name in names:
        try:
            # A few small files: MLflow's progress bars (stderr) would bury the command's own output.
            with env_defaults(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=name, dst_path=str(dst), tracking_uri=uri
                )
        except Exception as e:
            raise ModelRefError(
                f"{ref.text}: cannot download {name} of run {run_id} from the MLflow store at {uri} "
                f"(set MLFLOW_TRACKING_URI to the store the run is in): {one_line(e)}"
            ) from None
    return run_id


def hard_delete(client: MlflowClient, run_id: str | None = None, experiment_id: str | None = None) -> bool:
    """Remove an already deleted run or experiment for good, as ``mlflow gc`` does; False where the
    store keeps deleted ones (a tracking server). MLflow has no public API for it: this is the one
    place that calls its store's private methods (tests/test_modelref.py fails if they go away)."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not (hasattr(store, "_hard_delete_run") and hasattr(store, "_hard_delete_experiment")):
        return False
    if run_id is not None:
        store._hard_delete_run(run_id)
    if experiment_id is not None:
        store._hard_delete_experiment(experiment_id)
    return True


def _quick_http() -> contextlib.AbstractContextManager[None]:
    """A tracking server that is down fails the check in seconds, not after MLflow's minutes of retries."""
    return env_defaults(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


def check_store(uri: str, artifact_root: str | None) -> str:
    """Write a throwaway run with a metric and an artifact in ``uri``, read them back and delete
    them for good; returns where the artifact went. Uses MlflowClient only: no global MLflow state
    is changed, and a server that is down fails in seconds."""
    with _quick_http():
        return _roundtrip(uri, artifact_root)


def _roundtrip(uri: str, artifact_root: str | None) -> str:
    store_dir = local_store_dir(uri)
    # /health answers in milliseconds; MLflow's API calls to a dead server time out slowly.
    if is_server(uri) and (problem := server_problem(uri)):
        raise ConnectionError(f"the tracking server does not answer ({problem})")
    if store_dir is not None and (problem := write_problem(store_dir)):
        raise OSError(f"cannot create files in the store's folder {store_dir}: {problem}")
    with creation_lock(uri):  # a fresh store is created by one process at a time (training may start now)
        client = MlflowClient(uri)
    exp = client.get_experiment_by_name(CHECK_EXPERIMENT)
    if exp is None:
        location = artifact_location(store_dir, artifact_root, CHECK_EXPERIMENT)
        exp_id = client.create_experiment(CHECK_EXPERIMENT, artifact_location=location)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":  # left by an earlier check on a store without hard deletes
            client.restore_experiment(exp_id)
    run = client.create_run(exp_id, run_name="doctor", tags={"sketchsweep.role": "doctor"})
    run_id = run.info.run_id
    try:
        client.log_metric(run_id, "doctor", 1.0)
        client.log_text(run_id, "written by python -m sketchsweep.doctor\n", "doctor.txt")
        if client.get_run(run_id).data.metrics.get("doctor") != 1.0:
            raise RuntimeError("the metric written could not be read back")
        if [a.path for a in client.list_artifacts(run_id)] != ["doctor.txt"]:
            raise RuntimeError(f"the artifact written could not be listed back from {run.info.artifact_uri}")
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a "View run" link for servers
            client.set_terminated(run_id, "FINISHED")
    finally:
        _remove_run(client, uri, run_id, run.info.artifact_uri, exp_id)
    return run.info.artifact_uri.rsplit("/", 2)[0]


def _remove_run(client, uri: str, run_id: str, artifact_uri: str, exp_id: str) -> None:
    """Delete the throwaway run for good where the store allows it (what `mlflow gc` does), and the
    doctor's experiment once empty; on a server the run stays soft-deleted, out of sight."""
    with contextlib.suppress(Exception):  # nothing was written, or the artifact store is the problem (reported)
        get_artifact_repository(artifact_uri, tracking_uri=uri).delete_artifacts()
    client.delete_run(run_id)
    hard = hard_delete(client, run_id=run_id)
    local = Path(artifact_uri[len("file://") :]) if artifact_uri.startswith("file://") else None
    if local is not None:  # <experiment folder>/<run id>/artifacts: remove the empty folders left
        for folder in (local, local.parent, local.parent.parent):
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty: someone else's files
                break
    if not hard:
        # A server keeps deleted runs, and restoring an experiment would bring its runs back: the
        # doctor's experiment stays (empty to the eye); leftovers of an interrupted check go too.
        for old in client.search_runs([exp_id], filter_string="tags.`sketchsweep.role` = 'doctor'"):
            client.delete_run(old.info.run_id)
        return
    if client.search_runs([exp_id], run_view_type=ViewType.ALL, max_results=1):
        return  # someone keeps runs in it: leave it
    client.delete_experiment(exp_id)
    hard_delete(client, experiment_id=exp_id)


# -- runs whose process is gone: a SIGKILL, a crash or a lost node leaves them RUNNING -----------

HOST, PID, STARTED = "sketchsweep.host", "sketchsweep.pid", "sketchsweep.pid_started"  # where a run's process is


def _stat(pid: int) -> list[str] | None:
    """Process ``pid``'s /proc stat fields after its name (state first); None without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _started(fields: list[str]) -> str:
    """When a process started (boot id, clock ticks since boot): a pid reused by another process
    (a restarted container counts from 1 again) is not taken for the run's."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{boot}:{fields[19]}"


def process_tags() -> dict[str, str]:
    """The tags that let a later process tell whether this run's process is still alive."""
    fields = _stat(os.getpid())
    started = {STARTED: _started(fields)} if fields else {}
    return {HOST: socket.gethostname(), PID: str(os.getpid()), **started}


def process_gone(run) -> bool | None:
    """Whether a RUNNING run's process has ended: None when it ran on another host or is untagged
    (nobody here can know)."""
    tags = run.data.tags
    if tags.get(HOST) != socket.gethostname() or not tags.get(PID, "").isdigit():
        return None
    pid = int(tags[PID])
    if pid == os.getpid():
        return True  # this process is not the run's: its pid was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive, unless its pid was reused
        pass
    fields = _stat(pid)
    if fields is None:
        return False  # alive, and no /proc to tell more
    if fields[0] == "Z":
        return True  # killed, not yet reaped by its parent
    return STARTED in tags and tags[STARTED] != _started(fields)


def gone_runs(client: MlflowClient) -> list:
    """RUNNING runs, in every experiment, whose process on this host is gone."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'") if experiments else []
    return [r for r in running if process_gone(r)]


def end_gone_run(client: MlflowClient, run_id: str, why: str) -> None:
    """End a run whose process is gone as KILLED, saying why (tag ``sketchsweep.stopped``)."""
    client.set_tag(run_id, STOPPED, why)
    client.set_terminated(run_id, "KILLED")
