"""ONNX export: a tiny model trained by the real CLI, exported and checked with the real ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from sketchsweep.calibration import expected_calibration_error
from sketchsweep.checkpoint import TrainedModel, load_trained
from sketchsweep.config import saved_data_config
from sketchsweep.data.load import load_data
from sketchsweep.data.synthetic import draw_class
from sketchsweep.export import default_out, main
from sketchsweep.model import SketchCNN
from sketchsweep.modelref import BEST_WEIGHTS
from sketchsweep.onnx_export import ExportError, ParityError, check_parity, export_onnx
from sketchsweep.onnx_model import INPUT_CONTRACT
from sketchsweep.predict import Predictor
from tests.conftest import tiny_overrides, train_cli

# Shapes that look nothing alike, so 3 epochs give a model that is right on most drawings.
CLASSES = ["circle", "cross", "star", "zigzag"]


@dataclass
class TinyRun:
    run_dir: Path
    store: str
    run_id: str
    onnx_path: Path
    class_names: list[str]
    val_images: np.ndarray  # a few drawings of each class, uint8 (N, 28, 28)


_CACHE: dict[str, TinyRun] = {}


def tiny_run(tmp_path_factory) -> TinyRun:
    """One tiny model per test session, trained through `python -m sketchsweep.train` and exported:
    test_export and test_predict share it (a module cache, as a session fixture defined in two test
    modules would train twice)."""
    if "run" not in _CACHE:
        tmp = tmp_path_factory.mktemp("onnx-run")
        data = tmp / "data"
        data.mkdir()
        for name in CLASSES:
            np.save(data / f"{name}.npy", draw_class(name, 150, seed=0))
        store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
        run_dir = tmp / "run"
        with pytest.MonkeyPatch.context() as mp:
            # One intra-op thread: batches of 32 at width 8 gain nothing from two, and on a busy
            # 2-core machine two threads that spin-wait for each other made this run 2.5x slower.
            mp.setenv("OMP_NUM_THREADS", "1")
            proc = train_cli(tiny_overrides(data, store, run_dir), cwd=tmp)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        trained = load_trained(run_dir)
        assert trained.run_id, "the checkpoint should name its MLflow run"
        val = np.concatenate([draw_class(n, 3, seed=7) for n in CLASSES]).reshape(-1, 28, 28)
        report = export_onnx(trained, run_dir / "model.onnx", real_images=val)
        _CACHE["report"] = report
        _CACHE["run"] = TinyRun(run_dir, store, trained.run_id, report.path, trained.class_names, val)
    return _CACHE["run"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> TinyRun:
    return tiny_run(tmp_path_factory)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def run_onnx(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(session.run(["logits", "probabilities"], {"images": images}))


def random_model(width: int, classes: list[str]) -> TrainedModel:
    torch.manual_seed(width)
    model = SketchCNN(len(classes), width=width, hidden=64)
    # Non-trivial BatchNorm statistics: the exporter folds them into the convolutions.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return TrainedModel(model.eval(), classes, {"model": {"width": width, "hidden": 64}}, None, "random init")


@pytest.mark.parametrize("which", ["trained width 8", "random width 16"])
def test_export_matches_pytorch_with_metadata_and_any_batch(run, which, tmp_path):
    if which == "trained width 8":
        path, trained = run.onnx_path, load_trained(run.run_dir)
        report = _CACHE["report"]
    else:
        trained = random_model(16, run.class_names)
        report = export_onnx(trained, tmp_path / "w16.onnx", real_images=run.val_images)
        path = report.path
    assert report.path == path and path.is_file()
    assert report.max_abs_diff <= 1e-4 and report.top1_agree == 1.0
    assert report.num_real == len(run.val_images) and report.num_checked > report.num_real
    assert report.opset >= 18 and report.seconds > 0

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]

    meta = metadata(path)
    assert json.loads(meta["class_names"]) == run.class_names
    assert meta["input_contract"] == INPUT_CONTRACT
    assert meta["width"] == str(trained.width)
    assert meta["run_id"] == (run.run_id if which.startswith("trained") else "")
    assert meta["sketchsweep_version"]
    assert "temperature" not in meta and report.temperature == 1.0  # not calibrated: logits as the model's

    for n in (1, 7):  # the batch axis is dynamic
        x = run.val_images[:n]
        logits, probs = run_onnx(path, x)
        with torch.no_grad():
            ref = trained.model(torch.from_numpy(x).float().div(255).sub(0.5).div(0.5).unsqueeze(1)).numpy()
        assert logits.shape == probs.shape == (n, len(run.class_names))
        assert np.abs(logits - ref).max() <= 1e-4
        assert (logits.argmax(1) == ref.argmax(1)).all()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_a_failed_parity_check_is_an_error(run, tmp_path):
    # A different model than the one in the file.
    with pytest.raises(ParityError, match="does not match PyTorch"):
        check_parity(random_model(8, run.class_names).model, run.onnx_path, run.val_images)
    # A file ONNX Runtime cannot load.
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(run.onnx_path.read_bytes()[:5000])
    with pytest.raises(ExportError, match="cannot run it"):
        check_parity(load_trained(run.run_dir).model, broken)


def test_cli_keeps_nothing_when_parity_fails(run, tmp_path, capsys):
    # A run folder whose weights hold a NaN: it exports, but its outputs cannot match anything.
    bad = tmp_path / "bad-run"
    bad.mkdir()
    for name in ("config.yaml", "classes.json"):
        shutil.copy(run.run_dir / name, bad / name)
    state = torch.load(run.run_dir / BEST_WEIGHTS, weights_only=True)
    state["head.4.weight"][0, 0] = float("nan")
    torch.save(state, bad / BEST_WEIGHTS)
    out = tmp_path / "out" / "bad.onnx"
    assert main([str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "does not match PyTorch" in err and f"nothing written to {out}" in err
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temp file left either


def test_cli_exports_an_mlflow_run_to_the_current_folder(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run.store)
    monkeypatch.chdir(tmp_path)
    assert main([f"runs:/{run.run_id}"]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out
    meta = metadata(tmp_path / "model.onnx")
    assert meta["run_id"] == run.run_id and json.loads(meta["class_names"]) == run.class_names
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_cli_usage_errors_are_one_line_with_exit_code_2(run, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ([str(tmp_path / "missing")], "no such file or folder"),
        (["runs:/"], "expected runs:/<run_id>"),
        ([str(run.run_dir), "--out", str(tmp_path)], "is a folder"),
        ([str(run.run_dir), "--out", str(a_file / "model.onnx")], "cannot write there"),
        ([str(run.run_dir), "--out", str(tmp_path / "m.onnx"), "--opset", "11"], "opset 11"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_default_out_never_replaces_the_best_epochs_export_with_other_weights(run):
    d = run.run_dir
    assert default_out(str(d)) == d / "model.onnx"
    assert default_out(str(d / "checkpoint.pt")) == d / "model.onnx"
    assert default_out(str(d / BEST_WEIGHTS)) == d / "model.onnx"
    assert default_out(str(d / "model_weights.pth")) == d / "model_weights.onnx"
    assert default_out("runs:/abc") == Path("model.onnx")


def copy_run(run: TinyRun, folder: Path, head: tuple[float, float] = (0.0, 1.0), data: dict | None = None) -> Path:
    """The run's folder without its checkpoint: best weights, classes, split and config (its data
    section replaced by ``data``, or removed when ``data`` is ``{}``). ``head``: (noise, scale):
    the output layer's weights get that much noise (x their std, seeded) and are then scaled."""
    folder.mkdir()
    shutil.copy(run.run_dir / "classes.json", folder / "classes.json")
    shutil.copy(run.run_dir / "split.npz", folder / "split.npz")
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    if data is not None:
        config = {k: v for k, v in config.items() if k != "data"} | ({"data": data} if data else {})
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    state = torch.load(run.run_dir / BEST_WEIGHTS, weights_only=True)
    noise, scale = head
    w = state["head.4.weight"]
    w += noise * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    w *= scale
    state["head.4.bias"] *= scale
    torch.save(state, folder / BEST_WEIGHTS)
    return folder


def validation_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation drawings, uint8 (N, 28, 28), and labels, read from its data and split.npz."""
    data = load_data(saved_data_config(load_trained(folder).config), torch.device("cpu"))
    val = np.load(folder / "split.npz")["val"]
    return np.ascontiguousarray(data.images[val]).reshape(-1, 28, 28), data.labels[val]


def test_calibrate_folds_the_fitted_temperature_into_the_graph(run, tmp_path, capsys):
    # The tiny run's model is right on every validation drawing: no temperature fits that (T -> 0).
    out = tmp_path / "calibrated.onnx"
    assert main([str(run.run_dir), "--calibrate", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "every drawing there is classified right" in err and f"nothing written to {out}" in err
    assert not out.exists()
    # Made to err (noise in its output layer, ~73 % right) and overconfident (logits x 10), it has
    # something to calibrate.
    hot = copy_run(run, tmp_path / "hot", head=(2.0, 10.0))
    assert main([str(hot), "--calibrate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    t = float(metadata(out)["temperature"])
    assert t > 1 and f"temperature {t:.4f}" in printed and "the validation split" in printed
    # One Div more than an uncalibrated export of the same network: the logits divided by T.
    ops = [Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (out, run.onnx_path)]
    assert ops[0] - ops[1] == Counter({"Div": 1}) and not ops[1] - ops[0]

    images, labels = validation_split(hot)
    with torch.no_grad():
        raw = load_trained(hot).model(torch.from_numpy(images).float().div(255).sub(0.5).div(0.5).unsqueeze(1))
    logits, probs = run_onnx(out, images)
    np.testing.assert_allclose(logits, (raw / t).numpy(), atol=1e-4)
    np.testing.assert_allclose(probs, torch.softmax(raw / t, dim=1).numpy(), atol=1e-5)
    before = expected_calibration_error(torch.softmax(raw, dim=1).numpy(), labels)
    after = expected_calibration_error(probs, labels)
    assert after <= before
    assert f"ECE {before:.4f} -> {after:.4f}" in printed
    # predict reads the calibrated probabilities, and says which temperature they come from.
    predictor = Predictor(out)
    assert predictor.temperature == t
    np.testing.assert_allclose(predictor.probabilities(images), probs, atol=1e-6)

    # Fitted on the run's validation split, whatever the logits' scale: 10x the unscaled model's.
    plain = tmp_path / "plain.onnx"
    assert main([str(copy_run(run, tmp_path / "plain", head=(2.0, 1.0))), "--calibrate", "--out", str(plain)]) == 0
    assert t == pytest.approx(10 * float(metadata(plain)["temperature"]), rel=1e-3)


def test_calibrate_without_a_validation_split_is_one_line_and_writes_nothing(run, tmp_path, capsys):
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    cases = {
        "no data config": copy_run(run, tmp_path / "bare", data={}),  # weights without the data they came from
        str(tmp_path / "gone"): copy_run(
            run, tmp_path / "moved", data={**config["data"], "root": str(tmp_path / "gone")}
        ),
    }
    for needle, folder in cases.items():
        out = tmp_path / "out" / f"{folder.name}.onnx"
        assert main([str(folder), "--calibrate", "--out", str(out)]) == 2, needle
        err = capsys.readouterr().err
        assert err.startswith("error: --calibrate") and needle in err and err.count("\n") == 1, err
        assert not out.parent.exists()  # nothing written, not even the folder
