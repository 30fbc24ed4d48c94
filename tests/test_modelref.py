"""Model references, the checkpoint format, and MLflow's private store API kept in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sketchsweep.checkpoint import Checkpoint, CheckpointError, load_trained
from sketchsweep.model import SketchCNN
from sketchsweep.modelref import BEST_WEIGHTS, CHECKPOINT, ModelRef, ModelRefError
from sketchsweep.store import hard_delete


def test_every_form_of_reference_is_parsed_in_one_place(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in (CHECKPOINT, BEST_WEIGHTS, "model.onnx"):
        (run / name).write_bytes(b"x")
    cases = {
        str(run): ("folder", run),
        str(run / CHECKPOINT): ("checkpoint", run),
        str(run / BEST_WEIGHTS): ("weights", run),
        str(run / "model.onnx"): ("onnx", run),
    }
    for text, (kind, folder) in cases.items():
        ref = ModelRef.parse(text)
        assert (ref.kind, ref.folder, ref.remote) == (kind, folder, False), text
    assert ModelRef.parse("runs:/abc123/model").run_id == "abc123"
    by_version, by_alias = ModelRef.parse("models:/sketches/3"), ModelRef.parse("models:/sketches@champion")
    assert (by_version.name, by_version.version, by_version.alias) == ("sketches", "3", None)
    assert (by_alias.name, by_alias.version, by_alias.alias) == ("sketches", None, "champion")
    assert by_alias.remote and by_alias.folder is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("runs:/", "expected runs:/<run_id>"),
        ("models:/sketches", "expected models:/<name>/<version> or models:/<name>@<alias>"),
        ("models:/a/1/2", "expected models:/<name>/<version>"),
        ("no/such/folder", "no such file or folder"),
    ],
)
def test_bad_references_name_what_was_expected(text, message):
    with pytest.raises(ModelRefError, match=message):
        ModelRef.parse(text)


def test_a_folder_without_a_model_is_not_a_run(tmp_path):
    with pytest.raises(ModelRefError, match="not a training run folder"):
        ModelRef.parse(str(tmp_path))


def test_checkpoint_is_one_readable_dict_with_named_keys(tmp_path):
    model = SketchCNN(3, width=4, hidden=8)
    ckpt = Checkpoint(model=model.state_dict(), epoch=2, class_names=["a", "b", "c"], config={"model": {"width": 4}})
    ckpt.save(tmp_path / CHECKPOINT)
    raw = torch.load(tmp_path / CHECKPOINT, weights_only=True)  # what anyone can read without sketchsweep
    assert isinstance(raw, dict) and raw["epoch"] == 2 and raw["class_names"] == ["a", "b", "c"]
    assert set(raw) == {"model", "epoch", "class_names", "optimizer", "scheduler", "scaler", "rng", "history"} | {
        "best",
        "config",
        "mlflow_run_id",
        "ema",  # None without trainer.ema_decay
    }
    assert Checkpoint.load(tmp_path / CHECKPOINT).epoch == 2
    # The same format is what evaluate/export/predict load (its best weights, else its last).
    (tmp_path / "config.yaml").write_text("model: {width: 4, hidden: 8}\n")
    raw["config"] = {"model": {"width": 4, "hidden": 8}}
    torch.save(raw, tmp_path / CHECKPOINT)
    assert load_trained(tmp_path / CHECKPOINT).class_names == ["a", "b", "c"]


def test_a_bad_checkpoint_is_one_error_type(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    for path, message in [
        (tmp_path / "junk.pt", "cannot be read as a PyTorch file"),
        (tmp_path / "partial.pt", "no epoch/class_names entries"),
        (tmp_path / "missing.pt", "does not exist"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no epoch/class_names"):  # the same error through a reference
        load_trained(tmp_path / "partial.pt")


def test_hard_delete_removes_a_run_for_good(tmp_path):
    """store.hard_delete is the one call into MLflow's private store API (``mlflow gc`` uses it; no
    public API exists). On a SQLite store it must work, or the doctor leaves runs behind."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=(tmp_path / "x").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.delete_run(run_id)
    assert hard_delete(client, run_id=run_id) is True
    with pytest.raises(MlflowException):
        client.get_run(run_id)
    client.delete_experiment(exp)
    assert hard_delete(client, experiment_id=exp) is True
    assert "x" not in {e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    assert Path(tmp_path / "mlflow.db").exists()
