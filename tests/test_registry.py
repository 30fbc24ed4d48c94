"""The Model Registry with real stores: a run trained by the real CLI registered in SQLite and on a
real `mlflow server`, its alias, tags and metrics, and the registered model named as
models:/<name>@<alias> by sketchsweep's commands and served by `mlflow models serve`.

(evaluate/export/predict of a version registered the MLflow UI's way: tests/test_train.py.)"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pytest
from mlflow.tracking import MlflowClient

from sketchsweep import cli, predict, registry, tracking
from sketchsweep.modelref import ModelRef
from sketchsweep.store import registered_run
from tests.conftest import cli_env, free_port, stop_group, tiny_overrides, train_cli

TAGS = {"study": "tiny", "trial": 3, "objective": "val_acc", "value": 0.75, "data": "synthetic"}


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> tuple[str, str, Path]:
    """A run of the real CLI with its ONNX model logged, in a SQLite store: the store, run id and folder."""
    tmp = tmp_path_factory.mktemp("registry")
    uri, run_dir = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}", tmp / "run"
    proc = train_cli(tiny_overrides(tiny_data, uri, run_dir, "trainer.epochs=2", "mlflow.log_onnx=true"), cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])
    return uri, run.info.run_id, run_dir


def drawings(data: Path) -> np.ndarray:
    return np.concatenate([np.load(p)[:2] for p in sorted(data.glob("*.npy"))]).reshape(-1, 28, 28)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def expected_labels(run_dir: Path, images: np.ndarray) -> tuple[list[str], np.ndarray]:
    """What the run's model.onnx says, read with ONNX Runtime directly."""
    session = onnxruntime.InferenceSession(str(run_dir / "model.onnx"))
    names = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
    probabilities = session.run(["probabilities"], {"images": images})[0]
    return [names[i] for i in probabilities.argmax(1)], probabilities.max(1)


def test_a_run_is_registered_with_its_alias_tags_and_metrics(trained):
    uri, run_id, _ = trained
    client = MlflowClient(uri)
    assert registry.register(uri, run_id, "sketches", "champion", TAGS) == "1"
    version = client.get_model_version_by_alias("sketches", "champion")
    assert (str(version.version), version.run_id) == ("1", run_id)
    assert version.tags == {k: str(v) for k, v in TAGS.items()}
    # The run's served model is what was registered (the UI links models:/<id> as the source model).
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert (model.name, model.source_run_id) == ("onnx_model", run_id)
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "sketches", "version": "1"}]
    # The run's metrics are the model's, and the run's own history has no second copy of them.
    run = client.get_run(run_id)
    assert {m.key: m.value for m in model.metrics} == run.data.metrics
    assert "best_val_acc" in run.data.metrics and "onnx_max_abs_diff" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]


def test_the_alias_moves_to_the_newest_version_and_stale_ones_can_go(trained):
    uri, run_id, _ = trained
    client = MlflowClient(uri)
    assert registry.register(uri, run_id, "moving", "champion", TAGS) == "1"
    assert registry.register(uri, run_id, "moving", "pareto-1", TAGS) == "2"
    assert registry.register(uri, run_id, "moving", "champion", {}) == "3"
    assert str(client.get_model_version_by_alias("moving", "champion").version) == "3"
    assert aliases(client, "moving") == {"champion": "3", "pareto-1": "2"}
    assert client.get_model_version("moving", "3").tags == {}
    assert registry.retire_aliases(uri, "moving", "pareto-", keep={"pareto-2"}) == ["pareto-1"]
    assert aliases(client, "moving") == {"champion": "3"}


def test_models_by_name_lead_to_the_run_and_serve_class_names(trained, tiny_data, tmp_path, monkeypatch, capsys):
    uri, run_id, run_dir = trained
    registry.register(uri, run_id, "by-name", "champion", TAGS)
    client = MlflowClient(uri)
    for ref in ("models:/by-name@champion", "models:/by-name/1"):
        assert registered_run(client, ModelRef.parse(ref)) == run_id
    # sketchsweep's commands use the run's files; MLflow's pyfunc answers class names, not arrays.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    images = drawings(tiny_data)
    labels, probabilities = expected_labels(run_dir, images)
    np.save(tmp_path / "drawings.npy", images)
    capsys.readouterr()
    assert predict.main(["models:/by-name@champion", str(tmp_path / "drawings.npy"), "--json"]) == 0
    assert [json.loads(line)["top_k"][0]["label"] for line in capsys.readouterr().out.splitlines()] == labels
    mlflow.set_tracking_uri(uri)  # the process's global store (an earlier test may have set another) wins over the env
    served = mlflow.pyfunc.load_model("models:/by-name/1").predict(images, params={"top_k": 2})
    assert [r["label"] for r in served] == labels
    np.testing.assert_allclose([r["probability"] for r in served], probabilities, atol=1e-6)
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"] for r in served)


def test_what_cannot_be_registered_is_one_line_naming_it(trained, tmp_path):
    uri, run_id, _ = trained
    client = MlflowClient(uri)
    bare = client.create_run(client.get_experiment_by_name("sketchsweep").experiment_id).info.run_id
    client.set_terminated(bare)  # a finished run that logged no model (as with mlflow.log_onnx=false)
    down = f"http://127.0.0.1:{free_port()}"
    cases = [
        ((uri, bare, "errors", "champion"), f"run {bare}: no logged model 'onnx_model'"),
        ((uri, "0" * 32, "errors", "champion"), f"run {'0' * 32}: not found in the MLflow store"),
        ((uri, run_id, "a/b", "champion"), "registered model name 'a/b' (mlflow.registered_model"),
        ((uri, run_id, "errors", "v2"), "alias 'v2': expected"),
        ((uri, run_id, "errors", "latest"), "alias 'latest': expected"),
        ((down, run_id, "errors", "champion"), f"the MLflow server at {down} does not answer"),
    ]
    for args, message in cases:
        with pytest.raises(registry.RegistryError) as e:
            registry.register(*args, TAGS)
        assert isinstance(e.value, cli.UserError) and message in str(e.value)
        assert "\n" not in cli.message(e.value), cli.message(e.value)
    with pytest.raises(registry.RegistryError, match=r"mlflow\.log_onnx=true"):
        registry.register(uri, bare, "errors", None, {})
    assert client.search_registered_models(filter_string="name = 'errors'") == []  # nothing half-made


def test_the_served_model_needs_nothing_of_sketchsweep():
    """`mlflow models serve` runs served_model.py with numpy, onnxruntime and mlflow only."""
    path = Path(registry.__file__).with_name("served_model.py")
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"json", "typing", "numpy", "onnxruntime", "mlflow"}, imported


@pytest.mark.slow
def test_registered_on_a_real_mlflow_server(trained, tiny_data, mlflow_server):
    """The trained run's model.onnx logged by tracking.Run into a run on the server (training
    against a server: tests/test_scaleout.py), registered there and loaded back by name."""
    uri, images = mlflow_server.uri, drawings(tiny_data)
    run_dir = trained[2]
    with registry.global_store(uri):  # tracking.Run writes through MLflow's global store
        experiment = tracking.setup_experiment(uri, "registry", None)
        with tracking.Run(uri, experiment, "on-server", {}, {}) as run:
            run.log_metrics({"val_acc": 0.5, "best_val_acc": 0.75}, step=1)
            run.log_onnx(run_dir / "model.onnx", images[:2])
    run_id = run.id
    assert registry.register(uri, run_id, "on-server", "champion", TAGS) == "1"
    assert registry.register(uri, run_id, "on-server", "champion", TAGS) == "2"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("on-server", "champion")
    assert (str(version.version), version.run_id, version.tags["trial"]) == ("2", run_id, "3")
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert {m.key: m.value for m in model.metrics} == client.get_run(run_id).data.metrics
    assert registered_run(client, ModelRef.parse("models:/on-server/1")) == run_id
    with registry.global_store(uri):  # MLflow's pyfunc loader reads the global store
        served = mlflow.pyfunc.load_model("models:/on-server@champion").predict(images)
    assert [r["label"] for r in served] == expected_labels(run_dir, images)[0]


def test_mlflow_models_serve_answers_class_names(trained, tiny_data, tmp_path):
    uri, run_id, run_dir = trained
    registry.register(uri, run_id, "served", "champion", TAGS)
    port = free_port()
    # The venv's bin on PATH, as in an activated environment: MLflow starts `uvicorn` by name.
    env = {
        **cli_env(),
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    log = tmp_path / "serve.log"
    serve_options = ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served@champion", *serve_options],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        images = drawings(tiny_data)
        body = json.dumps({"inputs": images.tolist(), "params": {"top_k": 2}}).encode()
        answer, deadline = None, time.monotonic() + 300  # a hung start fails the test, not CI's job
        while answer is None:  # until the server answers (or has died)
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    answer = json.loads(r.read())
            except urllib.error.HTTPError as e:  # it answered, and refused the request
                pytest.fail(f"HTTP {e.code}: {e.read()[:2000]!r}")
            except OSError:  # not listening yet
                time.sleep(0.5)
    finally:
        stop_group(server)
    labels, probabilities = expected_labels(run_dir, images)
    predictions = answer["predictions"]
    assert [p["label"] for p in predictions] == labels
    np.testing.assert_allclose([p["probability"] for p in predictions], probabilities, atol=1e-6)
    assert [len(p["top_k"]) for p in predictions] == [2] * len(images)


@pytest.mark.slow
def test_a_single_run_registers_itself_with_mlflow_register(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = tiny_overrides(tiny_data, uri, tmp_path / "run", "trainer.epochs=1", "mlflow.log_onnx=true")
    proc = train_cli([*args, "mlflow.register=true", "mlflow.registered_model=tiny"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered as models:/tiny/1 (alias champion: models:/tiny@champion)" in proc.stdout + proc.stderr
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("tiny", "champion")
    [run] = client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])
    assert version.run_id == run.info.run_id and version.tags["objective"] == "val_acc"
    assert float(version.tags["value"]) == pytest.approx(run.data.metrics["best_val_acc"], abs=1e-5)


def test_register_without_an_onnx_model_fails_before_training(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    proc = train_cli([*tiny_overrides(tiny_data, uri, tmp_path / "run"), "mlflow.register=true"], cwd=tmp_path)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "expected mlflow.log_onnx=true" in lines[0], lines
    assert not (tmp_path / "mlruns").exists()
