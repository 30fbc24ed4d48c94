"""The MLflow Model Registry: a run's served model registered as a new version of a registered
model, an alias (``champion``, ``pareto-<rank>``) moved to it, tags and the run's metrics on it.

What is registered is the run's ``onnx_model`` (``tracking.Run.log_onnx``: the ONNX export in
``served_model.py``, which ``mlflow models serve`` runs and which answers class names). The
version keeps the run's id, so ``models:/<name>@<alias>`` and ``models:/<name>/<version>`` lead
``predict``, ``evaluate`` and ``export`` to the run's config, classes and weights
(``store.registered_run``). The run's metrics go to the logged model (MLflow 3's LoggedModel), whose
page, linked from the version's as its source model, lists them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import mlflow
from mlflow.entities import LoggedModel, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient, is_tracking_uri_set
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from sketchsweep.cli import UserError, one_line
from sketchsweep.credentials import hide_passwords
from sketchsweep.tracking import is_server, server_problem

SERVED = "onnx_model"  # the logged model a run is registered by


class RegistryError(UserError):
    """A run that cannot be registered: not in the store, no served model, a name the registry refuses."""


def register(uri: str, run_id: str, name: str, alias: str | None, tags: dict[str, Any]) -> str:
    """Register run ``run_id``'s served model (in the store at ``uri``) as a new version of ``name``;
    move ``alias`` to it, set ``tags`` (values as text) on it, and attach the run's metrics to its
    logged model. Returns the new version."""
    where = hide_passwords(uri)
    check_names(name, alias)
    if is_server(uri) and (problem := server_problem(uri)):  # quick: MLflow's own client retries for minutes
        raise RegistryError(
            f"run {run_id} not registered as '{name}': the MLflow server at {where} does not answer ({problem})"
        )
    client = MlflowClient(uri, registry_uri=uri)
    model = served_model(client, run_id, where)
    try:
        with global_store(uri):
            version = new_version(client, name, model, {k: str(v) for k, v in tags.items()})
        if alias is not None:
            client.set_registered_model_alias(name, alias, version)
        attach_metrics(client, run_id, model.model_id)
    except MlflowException as e:
        raise RegistryError(f"run {run_id} not registered as '{name}' in {where}: {one_line(e)}") from None
    return version


def new_version(client: MlflowClient, name: str, model: LoggedModel, tags: dict[str, str]) -> str:
    """A new version of ``name`` (created if needed) from ``model``, as ``mlflow.register_model``
    makes it (without its printing): source ``models:/<model_id>`` (the UI links it as the
    version's source model), and the version named in the model's ``mlflow.modelVersions`` tag."""
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # registered before, or by another process just now
            raise
    version = client.create_model_version(
        name, f"models:/{model.model_id}", run_id=model.source_run_id, tags=tags, model_id=model.model_id
    ).version
    listed = json.loads(client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    client.set_logged_model_tags(
        model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, {"name": name, "version": str(version)}])}
    )
    return str(version)


@contextlib.contextmanager
def global_store(uri: str) -> Iterator[None]:
    """MLflow's SQL registry looks a ``models:/<model_id>`` source up in the process's global
    store: point it at ``uri`` for the call (it usually is already: ``tracking.setup_experiment``)."""
    if mlflow.get_tracking_uri() == uri:
        yield
        return
    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def check_names(name: str, alias: str | None) -> None:
    """A registered model's name that ``models:/<name>...`` can name, and an alias MLflow takes."""
    if not name.strip() or re.search(r"[/:@]", name):
        raise RegistryError(
            f"registered model name {name!r} (mlflow.registered_model, default the experiment name): "
            "expected a name without '/', ':' or '@'"
        )
    if alias is not None and (not re.fullmatch(r"[\w-]{1,255}", alias) or re.fullmatch(r"latest|[vV]\d+", alias)):
        raise RegistryError(
            f"alias {alias!r}: expected letters, digits, '_' and '-', and neither 'latest' nor v<number> (reserved)"
        )


def served_model(client: MlflowClient, run_id: str, where: str) -> LoggedModel:
    """The run's most recent complete ``onnx_model``."""
    try:
        run = client.get_run(run_id)
        models = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{SERVED}'"
        )
    except MlflowException as e:
        raise RegistryError(f"run {run_id}: not found in the MLflow store at {where} ({one_line(e)})") from None
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        raise RegistryError(
            f"run {run_id}: no logged model '{SERVED}' to register; expected a finished run whose ONNX export was "
            "logged (mlflow.log_onnx=true; in a sweep, a trial that got its deliverables: sweep.deliverables)"
        )
    return max(ready, key=lambda m: m.creation_timestamp)


def attach_metrics(client: MlflowClient, run_id: str, model_id: str) -> None:
    """The run's latest metrics, each at its own step and time, logged again with the model's id:
    the logged model gets them, and the run's history stays as it was (MLflow keeps one point per
    key, step, time and value)."""
    data = client.get_run(run_id).data
    latest = [Metric.from_proto(m) for m in data.to_proto().metrics]
    metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in latest]
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def retire_aliases(uri: str, name: str, prefix: str, keep: set[str]) -> list[str]:
    """Remove ``name``'s aliases that start with ``prefix`` but are not in ``keep`` (e.g. a
    ``pareto-3`` left from an earlier, larger Pareto front); returns those removed."""
    client = MlflowClient(uri, registry_uri=uri)
    try:
        aliases = client.get_registered_model(name).aliases
        gone = sorted(a for a in aliases if a.startswith(prefix) and a not in keep)
        for alias in gone:
            client.delete_registered_model_alias(name, alias)
    except MlflowException as e:
        raise RegistryError(f"registered model '{name}' in {hide_passwords(uri)}: {one_line(e)}") from None
    return gone
