"""The checkpoint format, and a trained model loaded from any model reference.

``Checkpoint`` is ``checkpoint.pt``: one dict on disk (``torch.load(path, weights_only=True)``
reads it) whose keys are its fields. Training writes it every epoch and reads it to resume;
``load_trained`` reads it (or a run's weights, or an MLflow run's) for evaluate, export and predict.
Imports torch; MLflow only for ``runs:/`` and ``models:/`` references.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml  # PyYAML comes with omegaconf and mlflow

from sketchsweep.cli import one_line
from sketchsweep.data.views import Rows
from sketchsweep.engine import infer
from sketchsweep.model import SketchCNN
from sketchsweep.modelref import BEST_WEIGHTS, CHECKPOINT, CLASSES, CONFIG, ModelRef, ModelRefError

MODEL_KEYS = ("width", "hidden", "dropout", "negative_slope")  # the model config's SketchCNN arguments


class CheckpointError(ModelRefError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def read_torch_file(path: Path) -> Any:
    """``torch.load`` of a file sketchsweep wrote: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch file ({one_line(e)})") from None


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary name, then rename: a kill mid-write never corrupts the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (
        OSError,
        RuntimeError,
    ) as e:  # a full disk is torch's RuntimeError "[enforce fail at inline_container.cc..."
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped part way"
        free = shutil.disk_usage(path.parent).free / 2**20 if path.parent.is_dir() else 0
        raise CheckpointError(
            f"{path}: could not be written ({reason}); {free:.0f} MB free on its disk (full, or a file size limit?)"
        ) from None


@dataclass
class Checkpoint:
    """Everything a run needs to continue exactly where it stopped."""

    model: dict[str, torch.Tensor]  # the weights at the end of ``epoch``
    epoch: int  # the last completed epoch
    class_names: list[str]  # in label order
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None  # fp16's gradient scaler: a resumed run keeps its loss scale
    rng: dict[str, Any] = field(default_factory=dict)  # torch, shuffle (the data order) and cuda generator states
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics
    # epoch, value (of trainer.objective), model (its weights: the EMA's with trainer.ema_decay)
    best: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config it was trained with
    mlflow_run_id: str | None = None
    ema: dict[str, Any] | None = None  # trainer.ema_decay's moving average: model (its weights), updates

    REQUIRED = ("model", "epoch", "class_names")

    def save(self, path: Path) -> None:
        save_atomic({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(f"{p}: does not exist; expected a {CHECKPOINT} from an earlier run")
        raw = read_torch_file(p)
        missing = [k for k in cls.REQUIRED if not isinstance(raw, dict) or k not in raw]
        if missing:
            raise CheckpointError(f"{p}: not a sketchsweep {CHECKPOINT} (no {'/'.join(missing)} entries)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def capture(cls, model, optimizer, scheduler, scaler, shuffle: torch.Generator, device, **state) -> Checkpoint:
        """The training pieces' state now (``state``: epoch, class_names, history, best, config,
        mlflow_run_id), with every generator a run draws from, so a resumed run continues exactly."""
        rng = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return cls(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            rng=rng,
            **state,
        )

    def restore(self, model, optimizer, scheduler, scaler, shuffle: torch.Generator, device) -> None:
        """Put the training pieces back where ``capture`` found them: on a CPU the resumed run ends
        with exactly the weights an uninterrupted run would have."""
        try:
            model.load_state_dict(self.model)
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not fit this model config: {e}") from None
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.rng["torch"])
        shuffle.set_state(self.rng["shuffle"])
        if device.type == "cuda" and self.rng.get("cuda") is not None:
            torch.cuda.set_rng_state(self.rng["cuda"], device)
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)  # fp16: keep the loss scale it had found

    @property
    def best_weights(self) -> dict[str, torch.Tensor]:
        """The best epoch's weights: what a run keeps and reports (the last epoch's when unknown)."""
        best = self.best.get("model")
        if best is not None:
            return best
        return self.ema["model"] if self.ema is not None else self.model  # what the run kept: its EMA, if any


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

    def probabilities(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Softmax probabilities ``(N, classes)`` for uint8 drawings ``(N, 784)``/``(N, 28, 28)``."""
        rows = Rows(np.ascontiguousarray(images).reshape(-1, 784))
        return np.concatenate(
            [logits.softmax(dim=1).numpy() for logits, _ in infer(self.model, rows.batches(batch_size))]
        )


def build_model(state: dict[str, Any], class_names: list[str], config: dict[str, Any], source: str) -> SketchCNN:
    """SketchCNN as the run's model config describes it, with ``state`` loaded, in eval mode."""
    kwargs = {k: v for k, v in (config.get("model") or {}).items() if k in MODEL_KEYS}
    try:
        model = SketchCNN(len(class_names), **kwargs)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: the weights do not fit SketchCNN({kwargs}): {e}") from None
    return model.eval()


def load_trained(ref: str | Path | ModelRef) -> TrainedModel:
    """Load the model ``ref`` points at (its best epoch unless a ``*.pth`` is named); every problem
    is a ``ModelRefError`` (or ``CheckpointError``) naming it."""
    ref = ModelRef.parse(ref)
    if ref.kind == "onnx":
        raise ModelRefError(
            f"{ref.path}: an ONNX export has no PyTorch weights; give the run folder, checkpoint or runs:/ it came from"
        )
    if ref.remote:
        from sketchsweep import store  # MLflow: only for runs:/ and models:/

        with tempfile.TemporaryDirectory() as tmp:
            run_id = store.fetch_run_files(ref, (CONFIG, CLASSES, BEST_WEIGHTS), Path(tmp))
            trained = _from_weights(Path(tmp) / BEST_WEIGHTS, ref.text)
        trained.run_id = run_id
        return trained
    assert ref.path is not None
    if ref.kind == "folder":
        # The checkpoint holds the best weights, classes, config and run id: one read for all.
        if (ref.path / CHECKPOINT).is_file():
            return _from_checkpoint(ref.path / CHECKPOINT, ref.text)
        return _from_weights(ref.path / BEST_WEIGHTS, ref.text)
    if ref.kind == "weights":
        return _from_weights(ref.path, ref.text)
    return _from_checkpoint(ref.path, ref.text)


def _from_checkpoint(path: Path, source: str) -> TrainedModel:
    ckpt = Checkpoint.load(path)
    model = build_model(ckpt.best_weights, ckpt.class_names, ckpt.config, source)
    return TrainedModel(model, list(ckpt.class_names), ckpt.config, ckpt.mlflow_run_id, source)


def _from_weights(path: Path, source: str) -> TrainedModel:
    folder = path.parent
    missing = [n for n in (CONFIG, CLASSES) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{path}: {' and '.join(missing)} expected beside the weights (as a run folder has them)")
    try:
        config = yaml.safe_load((folder / CONFIG).read_text()) or {}
        class_names = json.loads((folder / CLASSES).read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CheckpointError(f"{folder}: cannot read {CONFIG}/{CLASSES}: {e}") from None
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise CheckpointError(f"{folder / CLASSES}: expected a JSON list of class names")
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state_dict")
    return TrainedModel(
        build_model(state, class_names, config, source), class_names, config, _run_id_beside(folder), source
    )


def _run_id_beside(folder: Path) -> str | None:
    """The MLflow run id of weights in a run folder, from the checkpoint beside them."""
    try:
        return Checkpoint.load(folder / CHECKPOINT).mlflow_run_id
    except CheckpointError:
        return None
