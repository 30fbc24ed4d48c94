"""A trained model ready to classify uint8 drawings: what ``predict`` and ``serve`` run.

An ``.onnx`` export runs on ONNX Runtime and torch is then never imported; a run folder,
checkpoint, ``runs:/`` or ``models:/`` reference loads the PyTorch model on the CPU
(``sketchsweep.checkpoint.load_trained``), importing torch then.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sketchsweep import cli
from sketchsweep.data import DataError
from sketchsweep.data.folder import as_uint8
from sketchsweep.modelref import ModelRef
from sketchsweep.onnx_model import INPUT_NAME, ModelFileError, class_names, open_session, temperature

BATCH = 1024


class InputError(ValueError):
    """An input that cannot be read as a drawing (reported and skipped by the CLI)."""


class Predictor:
    """A trained model ready to classify uint8 drawings, on ONNX Runtime for an ``.onnx`` file
    (no torch import) and on PyTorch (CPU) for a run folder, checkpoint, ``runs:/`` or ``models:/``.
    A bad reference raises ``ModelFileError`` (.onnx) or ``ModelRefError`` (both ValueErrors).
    ``temperature``: what a calibrated export divides its logits by (its probabilities are then
    calibrated ones); 1.0 for other exports and PyTorch models. ``run_id``: the MLflow run that
    trained it, when known; ``registered``: ``name/version`` or ``name@alias`` for a ``models:/``
    reference."""

    def __init__(self, model: str | Path) -> None:
        self.source = str(model)
        self.temperature = 1.0
        ref = ModelRef.parse(model)
        self.registered = None
        if ref.kind == "registry":
            self.registered = f"{ref.name}/{ref.version}" if ref.version else f"{ref.name}@{ref.alias}"
        if ref.kind == "onnx":
            self._open_onnx(ref.path)
        else:
            from sketchsweep.checkpoint import load_trained  # torch: only for PyTorch models

            self._trained = load_trained(ref)
            self.backend = "torch"
            self.class_names = self._trained.class_names
            self.run_id = self._trained.run_id

    def _open_onnx(self, path: Path) -> None:
        try:
            self._session = open_session(path)
        except Exception as e:
            raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({cli.one_line(e)})") from None
        names = class_names(self._session, path)
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)":
            raise ModelFileError(
                f"{path}: expected one uint8 input {INPUT_NAME!r}, got {[(i.name, i.type) for i in inputs]}"
            )
        self._input = inputs[0].name
        self.backend = "onnxruntime"
        self.class_names = names
        self.temperature = temperature(self._session)
        self.run_id = self._session.get_modelmeta().custom_metadata_map.get("run_id") or None

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``(N, classes)`` for uint8 ``(N, 28, 28)``/``(N, 784)`` (or floats in [0, 1])."""
        try:
            x = as_uint8(images).reshape(-1, 28, 28)
        except DataError as e:
            raise InputError(str(e)) from None
        if len(x) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        if self.backend == "torch":
            return self._trained.probabilities(x, BATCH)
        out = [
            self._session.run(["probabilities"], {self._input: np.ascontiguousarray(x[i : i + BATCH])})[0]
            for i in range(0, len(x), BATCH)
        ]
        return np.concatenate(out)

    def predict(self, images: np.ndarray, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """For each drawing, its ``top_k`` classes as ``(label, probability)``, most likely first."""
        probs = self.probabilities(images)
        k = min(top_k, len(self.class_names))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]
