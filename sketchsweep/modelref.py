"""One model reference: what a user names to point at a trained model, parsed in one place.

    outputs/2026-11-24/10-00-00               a training run's folder
    outputs/.../checkpoint.pt                 its resumable checkpoint
    outputs/.../best_model_weights.pth        weights, with config.yaml and classes.json beside them
    model.onnx                                an export (predict runs it on ONNX Runtime)
    runs:/<run_id>                            an MLflow run's artifacts
    models:/<name>/<version>                  a Model Registry version: the artifacts of the run
    models:/<name>@<alias>                    that logged the registered model

A run folder, checkpoint or run means the run's best epoch: the weights it keeps, logs and reports.
Imports neither torch nor MLflow (``predict`` with an ``.onnx`` needs neither); fetching a remote
reference's files is ``sketchsweep.store.fetch_run_files``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sketchsweep.cli import UserError

# What a training run's folder holds (sketchsweep.train writes them; its MLflow run has the same artifacts).
CHECKPOINT = "checkpoint.pt"  # resumable: sketchsweep.checkpoint.Checkpoint
FINAL_WEIGHTS = "model_weights.pth"  # the last epoch's state_dict, as the seed saved it
BEST_WEIGHTS = "best_model_weights.pth"  # the best epoch's (by trainer.objective)
CONFIG = "config.yaml"  # the resolved config
CLASSES = "classes.json"  # class names, in label order
SPLIT = "split.npz"  # train/val/test row indices into the loaded data
ONNX = "model.onnx"  # the best epoch exported (sketchsweep.export)

# What each command accepts, for help texts and errors.
PYTORCH_FORMS = "a run folder, a checkpoint.pt or *.pth in one, runs:/<run_id> or models:/<name>/<version|@alias>"
FORMS = PYTORCH_FORMS.replace("in one, ", "in one, an exported .onnx, ")


class ModelRefError(UserError):
    """A model reference that does not lead to a usable trained model."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference. ``kind`` is one of folder, checkpoint, weights, onnx (local files, at
    ``path``) or run, registry (in the MLflow store ``MLFLOW_TRACKING_URI`` names, default the
    project's)."""

    text: str  # as the user wrote it
    kind: str
    path: Path | None = None  # local kinds
    run_id: str | None = None  # run
    name: str | None = None  # registry: the registered model, and its version or alias
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str | Path | ModelRef) -> ModelRef:
        """Which kind ``ref`` is; a malformed or missing reference is a ``ModelRefError`` naming it."""
        if isinstance(ref, ModelRef):
            return ref
        text = str(ref)
        if text.startswith("runs:/"):
            run_id = text[len("runs:/") :].strip("/").split("/")[0]
            if not run_id:
                raise ModelRefError(f"{text}: expected runs:/<run_id>")
            return cls(text, "run", run_id=run_id)
        if text.startswith("models:/"):
            return cls._registry(text)
        path = Path(text).expanduser()
        if path.is_dir():
            if not (path / CHECKPOINT).is_file() and not (path / BEST_WEIGHTS).is_file():
                raise ModelRefError(f"{path}: not a training run folder (no {BEST_WEIGHTS} or {CHECKPOINT} in it)")
            return cls(text, "folder", path)
        if not path.is_file():
            raise ModelRefError(f"{path}: no such file or folder; expected {FORMS}")
        kind = {".onnx": "onnx", ".pth": "weights"}.get(path.suffix.lower(), "checkpoint")
        return cls(text, kind, path)

    @classmethod
    def _registry(cls, text: str) -> ModelRef:
        m = re.fullmatch(r"models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))/?", text)
        if m is None:
            raise ModelRefError(f"{text}: expected models:/<name>/<version> or models:/<name>@<alias>")
        return cls(text, "registry", name=m[1], version=m[2], alias=m[3])

    @property
    def remote(self) -> bool:
        """Whether the files are in an MLflow store rather than on this machine."""
        return self.kind in ("run", "registry")

    @property
    def folder(self) -> Path | None:
        """The run folder of a local reference (None for remote ones)."""
        if self.path is None:
            return None
        return self.path if self.kind == "folder" else self.path.parent
