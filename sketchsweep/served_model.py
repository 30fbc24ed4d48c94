"""The model MLflow serves for a run: its ``model.onnx`` on ONNX Runtime, answering class names.

An MLflow "model from code" (``tracking.Run.log_onnx`` logs this file with the ``.onnx`` as its
artifact ``onnx``): ``mlflow models serve`` and ``mlflow.pyfunc.load_model`` run it with numpy,
onnxruntime and mlflow only, nothing of sketchsweep. Input: uint8 ``(N, 28, 28)`` drawings (the
export's contract, ``onnx_model.INPUT_CONTRACT``). Output, one record per drawing, as
``predict --json`` prints: ``{"label": ..., "probability": ..., "top_k": [{"label": ...,
"probability": ...}, ...]}``, ``top_k`` classes (param, default 3) most likely first.
"""

import json
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow.pyfunc import PythonModel

TOP_K = 3


class SketchClassifier(PythonModel):
    def load_context(self, context) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ONNX Runtime's own warnings are not the server's business
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(context.artifacts["onnx"], options, providers=providers)
        self.classes = json.loads(self.session.get_modelmeta().custom_metadata_map["class_names"])

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        images = model_input["images"] if isinstance(model_input, dict) else model_input
        images = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28))
        k = max(1, min(int((params or {}).get("top_k", TOP_K)), len(self.classes)))
        probabilities = self.session.run(["probabilities"], {"images": images})[0]
        records = []
        for row in probabilities:
            top = [
                {"label": self.classes[i], "probability": float(row[i])} for i in np.argsort(-row, kind="stable")[:k]
            ]
            records.append({"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top})
        return records


mlflow.models.set_model(SketchClassifier())
