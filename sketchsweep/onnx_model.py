"""An exported model's contract, and ONNX Runtime opening it (the export's parity check and
``predict`` open it the same way). Imports neither torch nor MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort

from sketchsweep.cli import UserError

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
TEMPERATURE = "temperature"  # metadata of a calibrated export: its logits are the model's divided by it
INPUT_CONTRACT = (
    "input 'images': uint8 (N, 28, 28), N any, the Quick, Draw! numpy_bitmap format: strokes 255 on background 0, "
    "row-major (a (N, 784) row reshaped). Cast to float and Normalize(0.5, 0.5) (x/255*2-1) happen inside the graph. "
    "Outputs: 'logits' and 'probabilities' (softmax), float32 (N, C), C = len(class_names) from the metadata."
)


class ModelFileError(UserError):
    """An .onnx file that cannot be used as a sketchsweep model."""


def open_session(path: str | Path) -> ort.InferenceSession:
    """``path`` in ONNX Runtime on the CPU, its own log quiet: what cannot be loaded raises
    (ONNX Runtime's exception), nothing is printed."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def class_names(session: ort.InferenceSession, path: str | Path) -> list[str]:
    """The class names an export carries in its metadata, in output order."""
    try:
        names = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
    except (KeyError, ValueError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelFileError(
            f"{path}: not a sketchsweep export (no class_names list in its metadata; "
            "make one with python -m sketchsweep.export)"
        )
    return names


def temperature(session: ort.InferenceSession) -> float:
    """The temperature a calibrated export divides its logits by (``export --calibrate``); 1.0
    for an export without one (its probabilities are the model's plain softmax)."""
    value = session.get_modelmeta().custom_metadata_map.get(TEMPERATURE)
    try:
        return float(value) if value is not None else 1.0
    except ValueError:
        return 1.0
