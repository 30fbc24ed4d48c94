"""End to end through the real `python -m sketchsweep.train`, a real MLflow store and real files."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sketchsweep import tracking
from sketchsweep.config import PROJECT_ROOT
from sketchsweep.data import load_folder
from sketchsweep.engine import to_input
from sketchsweep.model import SketchCNN
from sketchsweep.train import train
from tests.conftest import (
    SHARED_QUICKDRAW,
    cli_env,
    compose_config,
    free_port,
    stop_group,
    tiny_overrides,
    train_cli,
    width4_overrides,
)

EPOCH_METRICS = [
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_top3",
    "val_ece",
    "lr",
    "epoch_seconds",
    "train_images_per_sec",
]


def only_run(uri: str, experiment: str = "sketchsweep"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """What `make demo` runs, in a temp dir with its own store and data cache."""
    tmp = tmp_path_factory.mktemp("quickstart")
    store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    run_dir = tmp / "run"
    proc = train_cli(
        [
            "experiment=quickstart",
            f"data.root={tmp / 'data'}",
            f"mlflow.tracking_uri={store}",
            f"hydra.run.dir={run_dir}",
            "mlflow.log_model=true",  # the PyTorch (pt2) model is opt-in; its tests below need it
        ],
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, run_dir, store, tmp


def test_quickstart_run_is_finished_with_every_epoch_metric(quickstart):
    _, _, store, _ = quickstart
    client, run = only_run(store, "quickstart")
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [1, 2, 3, 4], key
    m = run.data.metrics
    assert m["val_acc"] > 0.7  # 10 classes: chance is 0.1
    assert m["best_val_acc"] >= m["final_val_acc"] == m["val_acc"]
    assert 1 <= m["best_epoch"] <= 4
    assert m["val_top3"] >= m["val_acc"]


def test_quickstart_params_tags_and_name(quickstart):
    _, run_dir, store, _ = quickstart
    _, run = only_run(store, "quickstart")
    p, tags = run.data.params, run.data.tags
    assert p["model.width"] == "16" and p["trainer.epochs"] == "4"
    assert p["optimizer._target_"] == "torch.optim.Adam" and p["scheduler._target_"].endswith("CosineAnnealingLR")
    assert p["scheduler.T_max"] == "4"  # resolved, not "${trainer.epochs}"
    assert p["data.split_seed"] == "0" and p["trainer.device"] == "auto"
    assert "experiment=quickstart" in tags["hydra.overrides"]
    assert run.info.run_name.startswith("experiment=quickstart")
    assert tags["device"] == "cpu" and tags["torch.version"] == torch.__version__
    assert tags["sketchsweep.run_dir"] == str(run_dir)
    if (PROJECT_ROOT / ".git").exists():
        assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")


def test_quickstart_artifacts_and_run_folder(quickstart):
    _, run_dir, store, tmp = quickstart
    client, run = only_run(store, "quickstart")
    files = {"config.yaml", "classes.json", "model_weights.pth", "best_model_weights.pth", "checkpoint.pt"}
    assert files | {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log"} <= artifact_paths(
        client, run.info.run_id
    )
    assert files | {"train.log"} <= {p.name for p in run_dir.iterdir()}
    # Artifacts live beside the store (absolute), never in ./mlruns of the folder the job ran in.
    assert run.info.artifact_uri.startswith((tmp / "mlruns").as_uri())
    assert not (tmp / "mlruns" / "0").exists() and not (run_dir / "mlruns").exists()
    # The final weights load into SketchCNN as the seed's model_weights.pth did.
    model = SketchCNN(10, width=16)
    model.load_state_dict(torch.load(run_dir / "model_weights.pth", weights_only=True))
    log = (run_dir / "train.log").read_text()
    assert "epoch 4/4" in log and "run folder" in log


def test_quickstart_logged_model_predicts_like_the_best_weights(quickstart):
    _, run_dir, store, tmp = quickstart
    mlflow.set_tracking_uri(store)
    _, run = only_run(store, "quickstart")
    [logged] = [
        lm
        for lm in mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
        if lm.name == "model"  # the PyTorch one; "onnx_model" is the ONNX export
    ]
    loaded = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    ds = load_folder(next((tmp / "data").iterdir()))
    x = to_input(torch.from_numpy(ds.images[::97]))  # a batch of 62: the batch axis is dynamic
    best = SketchCNN(10, width=16).eval()
    best.load_state_dict(torch.load(run_dir / "best_model_weights.pth", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), best(x), rtol=1e-4, atol=1e-4)


def test_quickstart_logs_evaluation_and_a_parity_checked_onnx_model(quickstart):
    _, run_dir, store, _ = quickstart
    client, run = only_run(store, "quickstart")
    paths = artifact_paths(client, run.info.run_id)
    evaluation = {"per_class_accuracy.csv", "confused_pairs.csv", "confusion_matrix.png", "misclassified.png"}
    assert {f"evaluation/{n}" for n in evaluation} <= paths
    m = run.data.metrics
    # Evaluated with the kept (best-epoch) weights on the validation split: the run's best metrics.
    assert m["eval_top1"] == pytest.approx(m["best_val_acc"]) and m["eval_top3"] == pytest.approx(m["best_val_top3"])
    assert m["eval_top1"] <= m["eval_top3"] <= m["eval_top5"] and m["eval_images"] == 600
    assert m["onnx_max_abs_diff"] <= 1e-4
    # model.onnx in the run folder and an MLflow onnx model next to the PyTorch one.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(run_dir / "model.onnx"))
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == json.loads((run_dir / "classes.json").read_text())
    assert props["run_id"] == run.info.run_id
    mlflow.set_tracking_uri(store)
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    names = {lm.name for lm in logged}
    assert names == {"model", "onnx_model"}
    # A model server gets pixels as JSON numbers: the signature makes them uint8 again.
    from mlflow.models import convert_input_example_to_serving_input, validate_serving_input

    onnx_model = next(lm for lm in logged if lm.name == "onnx_model")
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # validate_serving_input is deprecated, not gone
        served = validate_serving_input(onnx_model.model_uri, convert_input_example_to_serving_input(images))
    classes = json.loads((run_dir / "classes.json").read_text())
    probabilities = session.run(None, {"images": images})[1]
    assert [r["label"] for r in served] == [classes[i] for i in probabilities.argmax(1)]  # class names, not arrays
    np.testing.assert_allclose([r["probability"] for r in served], probabilities.max(1), atol=1e-6)


def test_a_registered_model_is_evaluated_exported_and_used_by_name(quickstart, tmp_path, monkeypatch, capsys):
    """Register the run's logged model as the MLflow UI does, then name it as models:/<name>@<alias>
    or models:/<name>/<version>: evaluate, export and predict use the run that logged it."""
    import onnxruntime

    from sketchsweep import evaluate, export, predict

    _, run_dir, store, tmp = quickstart
    _, run = only_run(store, "quickstart")
    mlflow.set_tracking_uri(store)
    [logged] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'onnx_model'",
        output_format="list",
    )
    version = mlflow.register_model(logged.model_uri, "quickstart-sketches").version
    MlflowClient(store).set_registered_model_alias("quickstart-sketches", "champion", version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)

    assert evaluate.main(["models:/quickstart-sketches@champion"]) == 0
    metrics = json.loads((tmp_path / f"evaluation-{run.info.run_id}" / "metrics.json").read_text())
    assert metrics["eval_top1"] == pytest.approx(run.data.metrics["best_val_acc"])  # the run's own split
    assert export.main([f"models:/quickstart-sketches/{version}"]) == 0
    props = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).get_modelmeta().custom_metadata_map
    assert props["run_id"] == run.info.run_id
    images = load_folder(next((tmp / "data").iterdir())).images[::50]
    by_name = predict.Predictor("models:/quickstart-sketches@champion").probabilities(images)
    np.testing.assert_allclose(by_name, predict.Predictor(str(run_dir)).probabilities(images), atol=1e-6)
    capsys.readouterr()
    for ref in (f"models:/quickstart-sketches/{int(version) + 1}", "models:/nobody@champion"):
        assert evaluate.main([ref]) == 2
        err = capsys.readouterr().err
        assert f"{ref}: not in the Model Registry" in err and err.count("\n") == 1, err


def test_quickstart_prints_accuracy_folder_and_ui(quickstart):
    proc, run_dir, _, _ = quickstart
    out = proc.stdout + proc.stderr
    assert "val_acc" in out and f"run folder: {run_dir}" in out and "make ui" in out
    assert "\r" not in out  # not a terminal: plain lines, no progress bar
    assert "WARNING" not in out  # e.g. MLflow failing to serve the logged model's input example


def test_progress_bar_on_a_terminal(tiny_data, tmp_path, store):
    main, child = pty.openpty()
    # A new pty is 0x0; give it a real terminal's size so tqdm has columns to draw in.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sketchsweep.train", *tiny_overrides(tiny_data, store, tmp_path / "run")],
        cwd=tmp_path,
        env=cli_env(),
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/3" in out and "batch" in out and "\r" in out


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    ov = ["trainer.epochs=12", "trainer.batch_size=64", "model.dropout=0.5"]

    full = train_cli(tiny_overrides(tiny_data, store, tmp_path / "full", *ov), cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr

    cut_dir = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sketchsweep.train", *tiny_overrides(tiny_data, store, cut_dir, *ov)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (cut_dir / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "trainer.resume=" in out

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("sketchsweep")
    runs = {r.data.tags["sketchsweep.run_dir"]: r for r in client.search_runs([exp.experiment_id])}
    killed = runs[str(cut_dir)]
    assert killed.info.status == "KILLED"
    ckpt = torch.load(cut_dir / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["epoch"] < 12 and ckpt["mlflow_run_id"] == killed.info.run_id

    resume_dir = tmp_path / "resumed"
    resumed = train_cli(
        tiny_overrides(tiny_data, store, resume_dir, *ov, f"trainer.resume={cut_dir / 'checkpoint.pt'}"), cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "full" / "model_weights.pth", weights_only=True)
    b = torch.load(resume_dir / "model_weights.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    run = next(
        r for r in client.search_runs([exp.experiment_id]) if r.data.tags["sketchsweep.run_dir"] == str(resume_dir)
    )
    assert run.info.status == "FINISHED"
    assert run.data.tags["sketchsweep.resumed_from_run"] == killed.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == list(range(1, 13))


def test_signals_are_held_during_writes_and_immediate_during_compute():
    from sketchsweep.cli import held_signals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), held_signals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)  # outside compute: held
        time.sleep(0.05)
        assert signals.pending == signal.SIGTERM
        with signals.interruptible():  # the next compute does not start
            raise AssertionError("a held signal must stop before the next epoch's compute")
    with pytest.raises(KeyboardInterrupt), held_signals() as signals, signals.interruptible():
        os.kill(os.getpid(), signal.SIGINT)  # during compute: at once
        time.sleep(5)
    with pytest.raises(KeyboardInterrupt), held_signals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal does not wait
        time.sleep(5)
    with pytest.raises(KeyboardInterrupt), held_signals():  # held to the end: still stops what follows
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_job_nested_in_a_sweeps_signals_is_not_cut_on_its_way_back():
    """A job run in the sweep's process (Hydra's basic launcher) inside the sweep's interruptible
    launch: once the job's own handler is gone, a signal is held by the sweep, not raised into
    Hydra's bookkeeping after the trial was recorded (a flaky ``rc 130`` once the last trial was
    told); a signal the sweep holds stops the next job before it starts."""
    from sketchsweep.cli import held_signals

    with held_signals() as sweep:
        with sweep.interruptible():
            with held_signals() as job:
                job.settle()  # the trial is recorded
            os.kill(os.getpid(), signal.SIGTERM)  # Hydra's way back from the job
            time.sleep(0.05)
            assert sweep.pending == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt), held_signals():
                raise AssertionError("a signal the sweep holds must stop the next job before it starts")
        assert sweep.pending is None and not sweep.open


def test_sigterm_during_a_store_write_completes_it_then_stops(tiny_data, tmp_path, store, monkeypatch):
    """A signal that lands inside MLflow's SQLite write used to leave the store locked: the run
    could not be marked KILLED and the process hung for a minute. Now the write completes first."""
    real = tracking.Run.log_metrics

    def log_metrics(self, metrics, step):
        if step == 2 and "val_acc" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the epoch's metrics are written
        real(self, metrics, step)

    monkeypatch.setattr(tracking.Run, "log_metrics", log_metrics)
    cfg = compose_config([o for o in tiny_overrides(tiny_data, store, tmp_path) if not o.startswith("hydra.")])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    client, run = only_run(store)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_exception_mid_run_marks_the_run_failed_with_traceback(tiny_data, tmp_path, store):
    proc = train_cli(
        tiny_overrides(tiny_data, store, tmp_path / "run", "optimizer=sgd", "optimizer.lr=1e30"), cwd=tmp_path
    )
    assert proc.returncode != 0
    client, run = only_run(store)
    assert run.info.status == "FAILED"
    assert "error.txt" in artifact_paths(client, run.info.run_id)
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt")
    assert "FloatingPointError" in text and "training loss is" in text


def test_bad_data_file_is_one_clear_error_before_any_run(tmp_path):
    data = tmp_path / "qd"
    data.mkdir()
    np.save(data / "cat.npy", np.zeros((10, 784), np.uint8))
    np.save(data / "dog.npy", np.zeros((10, 100), np.uint8))
    db = tmp_path / "mlruns" / "mlflow.db"
    proc = train_cli(["data=quickdraw", f"data.root={data}", f"mlflow.tracking_uri=sqlite:///{db}"], cwd=tmp_path)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert f"{data / 'dog.npy'}: has shape (10, 100); expected" in out
    assert "Traceback" not in out
    assert not db.exists()


def test_missing_root_and_bad_resume_are_clear_errors(tmp_path, tiny_data):
    proc = train_cli(["data=quickdraw", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'db'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "data.root: not set" in proc.stdout + proc.stderr
    proc = train_cli(
        ["data=quickdraw", f"data.root={tiny_data}", f"trainer.resume={tmp_path / 'nope.pt'}"], cwd=tmp_path
    )
    assert proc.returncode == 2 and "trainer.resume=" in proc.stdout + proc.stderr and "does not exist" in proc.stdout


def test_grid_multirun_jobs_share_one_store_under_one_parent(tiny_data, tmp_path, store):
    ov = tiny_overrides(tiny_data, store, tmp_path / "unused", "trainer.epochs=1")
    ov = [o for o in ov if not o.startswith("hydra.run.dir")]
    proc = train_cli(["-m", *ov, "model.width=4,8", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sketchsweep.role") == "multirun"]
    jobs = [r for r in runs if r is not parent]
    assert sorted(r.data.params["model.width"] for r in jobs) == ["4", "8"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in jobs)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_default_store_is_absolute_under_the_project(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri(None) == f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.tracking_uri(None) == "http://127.0.0.1:9"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.skipif(not SHARED_QUICKDRAW.is_dir(), reason="real Quick, Draw! data not present in ../shared/data")
def test_trains_on_real_quickdraw_drawings(tmp_path, store):
    cfg = compose_config(
        [
            "experiment=quickdraw24",  # the preset that reads ../shared/data/quickdraw
            "data.classes=[apple,bicycle,star,house]",
            "data.max_per_class=400",
            "model.width=8",
            "trainer.epochs=2",
            "trainer.batch_size=64",
            f"mlflow.tracking_uri={store}",
            "mlflow.log_model=false",
            "mlflow.log_onnx=false",
            "mlflow.log_evaluation=false",
        ]
    )
    value = train(cfg, tmp_path / "run")
    assert value > 0.6  # 4 classes: chance is 0.25
    _, run = only_run(store, "quickdraw24")
    assert run.info.status == "FINISHED" and run.data.metrics["best_val_acc"] == value
    assert Path(run.data.params["data.root"]).resolve() == SHARED_QUICKDRAW.resolve()


@pytest.mark.slow
def test_mlflow_ui_serves_the_run_metrics_and_artifacts(quickstart):
    """What `make ui` starts, on the quickstart store: the run, its metrics and its files."""
    import json
    import urllib.request

    _, _, store, tmp = quickstart
    _, run = only_run(store, "quickstart")
    port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stop_group stops its uvicorn too
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return r.read()

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                get("/health")
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        got = json.loads(get(f"/api/2.0/mlflow/runs/get?run_id={run.info.run_id}"))["run"]
        assert got["info"]["status"] == "FINISHED"
        assert {m["key"] for m in got["data"]["metrics"]} >= set(EPOCH_METRICS)
        files = json.loads(get(f"/ajax-api/2.0/mlflow/artifacts/list?run_id={run.info.run_id}"))["files"]
        assert {"checkpoint.pt", "model_weights.pth", "config.yaml"} <= {f["path"] for f in files}
        assert b"model:" in get(f"/get-artifact?path=config.yaml&run_uuid={run.info.run_id}")
    finally:
        stop_group(ui)


def test_impossible_trainer_settings_are_named(tmp_path):
    from sketchsweep.config import ConfigError

    with pytest.raises(ConfigError, match="epochs >= 1"):
        train(compose_config(["trainer.epochs=0"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_augmentation_and_a_held_out_test_split(tiny_data, tmp_path, store):
    cfg = compose_config(
        [
            "data=quickdraw",
            f"data.root={tiny_data}",
            "data.test_fraction=0.2",
            "data.augment.enabled=true",
            "data.augment.hflip=true",
            "trainer.precision=bf16",  # CPU autocast: the switch works where supported
            "model.width=8",
            "trainer.epochs=2",
            "trainer.batch_size=32",
            f"mlflow.tracking_uri={store}",
            "mlflow.log_model=false",
            "mlflow.log_onnx=false",
            "mlflow.log_evaluation=false",
        ]
    )
    train(cfg, tmp_path / "run")
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and run.data.params["data.augment.enabled"] == "True"
    assert {"test_acc", "test_top3", "test_loss"} <= run.data.metrics.keys()
    split = np.load(tmp_path / "run" / "split.npz")
    assert len(split["test"]) == 4 * 24 and len(split["val"]) == 4 * 12  # 120 per class: 20% / 10%
    assert "split.npz" in artifact_paths(client, run.info.run_id)


def test_fp16_resume_keeps_the_gradient_scalers_state(tiny_data, tmp_path, store):
    # autocast + GradScaler; CPU autocast supports fp16
    common = width4_overrides(tiny_data, store, "trainer.precision=fp16")
    train(compose_config([*common, "trainer.epochs=1"]), tmp_path / "first")
    ckpt = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    # Make the saved scale distinctive, then check the resumed run starts from it.
    ckpt["scaler"]["scale"] = 1024.0
    torch.save(ckpt, tmp_path / "edited.pt")
    train(compose_config([*common, "trainer.epochs=2", f"trainer.resume={tmp_path / 'edited.pt'}"]), tmp_path / "two")
    resumed = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    # The scale only changes by growth (x2 after 2000 clean steps) or backoff (x0.5 on overflow):
    # one short epoch from 1024 stays at 1024 or halves, never back to the default 65536.
    assert resumed["scaler"]["scale"] in (1024.0, 512.0, 256.0)
