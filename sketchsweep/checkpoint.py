"""Find a trained model from what a user has at hand: a run folder, a checkpoint, or an MLflow run.

    load_trained("outputs/2026-11-24/10-00-00")         # a training run's folder
    load_trained("outputs/.../checkpoint.pt")           # the resumable checkpoint
    load_trained("outputs/.../best_model_weights.pth")  # weights, with config.yaml + classes.json beside them
    load_trained("runs:/<run_id>")                       # the artifacts of an MLflow run

The best epoch's weights are used unless a ``*.pth`` file is named explicitly: they are what a
run keeps, logs and reports as its objective. Imports torch only; mlflow only for ``runs:/``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sketchsweep.model import SketchCNN

# File names a training run writes (sketchsweep.train uses the same names).
CHECKPOINT = "checkpoint.pt"
FINAL_WEIGHTS = "model_weights.pth"
BEST_WEIGHTS = "best_model_weights.pth"
CONFIG = "config.yaml"
CLASSES = "classes.json"
MODEL_KEYS = ("width", "hidden", "dropout", "negative_slope")


class ModelRefError(ValueError):
    """A model reference that does not lead to a usable trained model."""


@dataclass
class TrainedModel:
    """A SketchCNN in eval mode on the CPU, with what is needed to use and describe it."""

    model: SketchCNN
    class_names: list[str]
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config
    run_id: str | None = None  # the MLflow run that trained it, when known
    source: str = ""  # what it was loaded from, for messages and metadata

    @property
    def width(self) -> int:
        return self.model.features[0][0].out_channels


def load_trained(ref: str | Path) -> TrainedModel:
    """Load the model ``ref`` points at; every problem is one ``ModelRefError`` naming ``ref``."""
    text = str(ref)
    if text.startswith("runs:/"):
        return _from_mlflow(text)
    path = Path(text).expanduser()
    if path.is_dir():
        # The checkpoint holds the best weights, classes, config and run id: one read for all.
        if (path / CHECKPOINT).is_file():
            return _from_checkpoint(path / CHECKPOINT, text)
        if (path / BEST_WEIGHTS).is_file():
            return _from_weights(path / BEST_WEIGHTS, text)
        raise ModelRefError(f"{path}: not a training run folder (no {BEST_WEIGHTS} or {CHECKPOINT} in it)")
    if not path.is_file():
        raise ModelRefError(f"{path}: no such file or folder; expected a run folder, a checkpoint or runs:/<run_id>")
    if path.suffix == ".pth":
        return _from_weights(path, text)
    return _from_checkpoint(path, text)


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelRefError(f"{path}: cannot be read as a PyTorch file ({type(e).__name__}: {first})") from None


def _build(state: dict[str, Any], class_names: list[str], config: dict[str, Any], source: str) -> SketchCNN:
    kwargs = {k: v for k, v in (config.get("model") or {}).items() if k in MODEL_KEYS}
    try:
        model = SketchCNN(len(class_names), **kwargs)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelRefError(f"{source}: the weights do not fit SketchCNN({kwargs}): {e}") from None
    return model.eval()


def _from_checkpoint(path: Path, source: str) -> TrainedModel:
    ckpt = _read(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "class_names" not in ckpt:
        raise ModelRefError(f"{path}: not a sketchsweep {CHECKPOINT} (no model/class_names entries)")
    best = (ckpt.get("best") or {}).get("model")
    config = ckpt.get("config") or {}
    model = _build(best if best is not None else ckpt["model"], ckpt["class_names"], config, source)
    return TrainedModel(model, list(ckpt["class_names"]), config, ckpt.get("mlflow_run_id"), source)


def _from_weights(path: Path, source: str) -> TrainedModel:
    folder = path.parent
    missing = [n for n in (CONFIG, CLASSES) if not (folder / n).is_file()]
    if missing:
        raise ModelRefError(f"{path}: {' and '.join(missing)} expected beside the weights (as a run folder has them)")
    import yaml  # PyYAML comes with omegaconf and mlflow

    try:
        config = yaml.safe_load((folder / CONFIG).read_text()) or {}
        class_names = json.loads((folder / CLASSES).read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ModelRefError(f"{folder}: cannot read {CONFIG}/{CLASSES}: {e}") from None
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise ModelRefError(f"{folder / CLASSES}: expected a JSON list of class names")
    state = _read(path)
    if not isinstance(state, dict):
        raise ModelRefError(f"{path}: expected a state_dict")
    run_id = _run_id_beside(folder)
    return TrainedModel(_build(state, class_names, config, source), class_names, config, run_id, source)


def _run_id_beside(folder: Path) -> str | None:
    ckpt = folder / CHECKPOINT
    if ckpt.is_file():
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=True).get("mlflow_run_id")
        except Exception:
            return None
    return None


def _from_mlflow(ref: str) -> TrainedModel:
    """Download the run's config, classes and best weights (from the configured tracking URI)."""
    import mlflow

    from sketchsweep.tracking import tracking_uri

    run_id = ref[len("runs:/") :].strip("/").split("/")[0]
    if not run_id:
        raise ModelRefError(f"{ref}: expected runs:/<run_id>")
    mlflow.set_tracking_uri(tracking_uri(None))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in (CONFIG, CLASSES, BEST_WEIGHTS):
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp)
        except Exception as e:
            raise ModelRefError(
                f"{ref}: cannot download {name} from the MLflow store at {mlflow.get_tracking_uri()} "
                f"(set MLFLOW_TRACKING_URI to the store the run is in): {type(e).__name__}: {e}"
            ) from None
        trained = _from_weights(Path(tmp) / BEST_WEIGHTS, ref)
    trained.run_id = run_id
    return trained
