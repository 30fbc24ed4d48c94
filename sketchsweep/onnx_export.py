"""The ONNX export as a library function: SketchCNN behind the deployment contract, exported with
the preprocessing inside the graph, checked by ONNX Runtime against PyTorch before it is kept.
``python -m sketchsweep.export`` is its command; training and sweeps call ``export_onnx`` directly.

The exported model's contract (``onnx_model.INPUT_CONTRACT``, also stored in the file's metadata):
input ``images`` uint8 ``(N, 28, 28)`` in the Quick, Draw! numpy_bitmap format (strokes 255 on
background 0), any N; outputs ``logits`` and ``probabilities`` (softmax), float32 ``(N, classes)``.
The cast to float and Normalize(0.5, 0.5) happen inside the graph, so a deployment cannot get
the scaling wrong. A calibrated export (``temperature`` != 1, ``export --calibrate``) divides the
logits by the temperature in the graph, so both outputs are calibrated; the metadata names it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from sketchsweep import cli
from sketchsweep.checkpoint import TrainedModel
from sketchsweep.data import DataError
from sketchsweep.data.folder import as_uint8
from sketchsweep.data.views import Rows
from sketchsweep.engine import infer, to_input
from sketchsweep.modelref import ONNX
from sketchsweep.onnx_model import INPUT_CONTRACT, INPUT_NAME, OUTPUT_NAMES, TEMPERATURE, open_session

ATOL = 1e-4  # max |logit difference| allowed between ONNX Runtime and PyTorch
DEFAULT_NAME = ONNX
MIN_OPSET = 17  # the dynamo exporter writes opset 18 and newer; 17 works through onnx's version converter


class ExportError(RuntimeError):
    """An export that did not produce a usable, verified .onnx file."""


class ExportArgumentError(ExportError, cli.UserError):
    """An --out that cannot be written or an --opset the exporter cannot target (CLI exit code 2)."""


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance."""


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float  # on logits, over every checked input
    top1_agree: float  # fraction of checked inputs with the same top-1 class
    opset: int
    seconds: float
    num_checked: int = 0  # inputs compared (random + real)
    num_real: int = 0  # of which real drawings
    temperature: float = 1.0  # the logits are divided by it in the graph (1: not calibrated)


class Deployable(nn.Module):
    """SketchCNN behind the deployment contract: uint8 (N, 28, 28) in, (logits, probabilities) out.
    It reuses training's ``to_input``, so the graph normalizes exactly as training did. With a
    ``temperature`` other than 1 both outputs are calibrated: the logits are divided by it before
    the softmax (and returned divided, so softmax(logits) is still the probabilities)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(to_input(images))
        if self.temperature != 1.0:  # decided when traced: an uncalibrated graph has no Div at all
            logits = logits / self.temperature
        return logits, torch.softmax(logits, dim=1)


def sketchsweep_version() -> str:
    try:
        return metadata.version("sketchsweep")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_onnx(
    trained: TrainedModel,
    out: Path,
    opset: int | None = None,
    real_images: np.ndarray | None = None,
    temperature: float = 1.0,
) -> ExportReport:
    """Export ``trained`` to ``out`` and check it with ONNX Runtime on random and ``real_images``
    (uint8 ``(N, 784)``/``(N, 28, 28)``); ``temperature``: divide the logits by it in the graph
    (``calibration.fit_temperature``'s), checked against PyTorch's logits divided alike. ``out``
    is only created once the check passes; any failure raises ``ExportError`` (``ParityError``
    for a parity failure)."""
    start = time.perf_counter()
    out = Path(out)
    real = None if real_images is None else as_batch(real_images)
    if opset is not None and not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportArgumentError(f"opset {opset}: expected {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ExportArgumentError(f"temperature {temperature}: expected a finite number > 0")
    tmp = _temp_beside(out)  # fail on an unwritable --out before the slow part
    try:
        # A copy in fp32 eval mode on the CPU: the caller's model (maybe on a GPU, in train mode,
        # channels-last) is left as it is.
        # (``_orig_mod``: the model inside a torch.compile wrapper.)
        model = copy.deepcopy(getattr(trained.model, "_orig_mod", trained.model)).eval()
        model = model.to("cpu", torch.float32).to(memory_format=torch.contiguous_format)
        proto = _to_onnx(Deployable(model, temperature), opset)
        _add_metadata(proto, trained, temperature)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported model: {cli.one_line(e)}") from None
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
        if opset is not None and opset_used != opset:
            # The exporter falls back to its own opset when it cannot convert: say so instead.
            raise ExportArgumentError(f"opset {opset}: the exporter cannot target it (it produced opset {opset_used})")
        onnx.save_model(proto, tmp)
        max_diff, agree, n = check_parity(model, tmp, real, temperature=temperature)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    n_real = 0 if real is None else len(real)
    return ExportReport(out, max_diff, agree, opset_used, time.perf_counter() - start, n, n_real, temperature)


def _temp_beside(out: Path) -> Path:
    """A temporary file in ``out``'s folder (same file system, so the final rename is atomic)."""
    if out.is_dir():
        raise ExportArgumentError(f"{out}: is a folder; give a file name, e.g. {out / DEFAULT_NAME}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
        # Not mkstemp: its files are private (0600); this one gets the usual mode (umask applies).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise ExportArgumentError(f"{out}: cannot write there ({e.strerror or e})") from None
    return tmp


def _to_onnx(module: nn.Module, opset: int | None) -> onnx.ModelProto:
    # The dynamo exporter (torch.export + onnxscript): the legacy TorchScript exporter cannot export
    # SketchCNN at all, as AdaptiveAvgPool2d(4) on a 7x7 map has overlapping windows
    # ("output size that are not factor of input size"). Example batch 2, not 1: torch.export
    # specializes dimensions of size 1, which would fix the batch.
    example = torch.zeros(2, 28, 28, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    # torch.onnx logs "torchvision is not installed" notices and onnxscript a traceback when it cannot
    # convert to the requested opset (checked after the export); onnx_ir logs each optimization pass
    # at INFO (8 lines per export in a run's console). None of it belongs in our output.
    quiet = {"torch.onnx": logging.CRITICAL, "onnxscript": logging.CRITICAL, "onnx_ir": logging.WARNING}
    loggers = [logging.getLogger(n) for n in quiet]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(quiet[lg.name])
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"images": {0: batch}},
                verbose=False,  # the default optimize=True folds BatchNorm into the convolutions
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed (opset {opset or 'default'}): {cli.one_line(e)}") from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return program.model_proto


def _add_metadata(proto: onnx.ModelProto, trained: TrainedModel, temperature: float = 1.0) -> None:
    props = {
        "class_names": json.dumps(trained.class_names),
        "input_contract": INPUT_CONTRACT,
        "run_id": trained.run_id or "",
        "width": str(trained.width),
        "sketchsweep_version": sketchsweep_version(),
        "torch_version": torch.__version__,
        "source": str(trained.source),
    }
    calibrated = ""
    if temperature != 1.0:  # only calibrated exports carry it: an export without it has T = 1
        props[TEMPERATURE] = repr(float(temperature))
        calibrated = f", logits divided by temperature {temperature:.4g}"
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (
        f"SketchCNN (width {trained.width}, {len(trained.class_names)} classes{calibrated}) from sketchsweep"
    )


def as_batch(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 784)``/``(N, 28, 28)``, or floats in [0, 1], as uint8 ``(N, 28, 28)``."""
    a = np.asarray(images)
    if a.ndim not in (2, 3) or a.shape[1:] not in ((784,), (28, 28)):
        raise ExportError(f"real_images: expected (N, 784) or (N, 28, 28), got shape {a.shape}")
    try:
        return np.ascontiguousarray(as_uint8(a, "real_images").reshape(-1, 28, 28))
    except DataError as e:
        raise ExportError(str(e)) from None


def probe_images(real_images: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The inputs a parity check runs on: random images of several kinds, then ``real_images``."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    # Sparse strokes-like: mostly background, some ink, as drawings are.
    sparse = np.where(rng.random((4, 28, 28)) < 0.12, rng.integers(64, 256, size=(4, 28, 28)), 0).astype(np.uint8)
    blank, full = np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 255, np.uint8)
    parts = [noise, sparse, blank, full]
    if real_images is not None:
        parts.append(as_batch(real_images))
    return np.concatenate(parts)


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    real_images: np.ndarray | None = None,
    atol: float = ATOL,
    temperature: float = 1.0,
) -> tuple[float, float, int]:
    """Run ``onnx_path`` in ONNX Runtime and ``model`` (a SketchCNN, fed as training feeds it, its
    logits divided by ``temperature``) in PyTorch on ``probe_images`` as one batch and again at
    batch 1; return ``(max |logit difference|, top-1 agreement, inputs checked)`` or raise
    ``ParityError``."""
    x = probe_images(real_images)
    try:
        session = open_session(onnx_path)
        logits, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        single = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[:1]})[0]
    except Exception as e:
        raise ParityError(f"{onnx_path}: ONNX Runtime cannot run it: {cli.one_line(e)}") from None
    model = model.to("cpu", torch.float32)
    ((ref, _),) = infer(model, Rows(x.reshape(-1, 784)).batches(len(x)))
    ref = (ref / temperature if temperature != 1.0 else ref).numpy()
    if logits.shape != ref.shape or single.shape != ref[:1].shape:
        raise ParityError(f"{onnx_path}: ONNX Runtime gave logits {logits.shape}, PyTorch {ref.shape}")
    ref_probs = torch.softmax(torch.from_numpy(ref), dim=1).numpy()
    diff = float(max(np.abs(logits - ref).max(), np.abs(single - ref[:1]).max()))
    prob_diff = float(np.abs(probs - ref_probs).max())
    # fp32 rounding (and ONNX Runtime's Conv+BatchNorm fusion) errs in proportion to the logits'
    # size: the bound is atol for logits up to 10 in magnitude and grows with them beyond that
    # (random-pixel probes can push a trained model's logits far past anything a drawing gives).
    tol = atol * max(1.0, float(np.abs(ref).max()) / 10)
    top_ort, top_ref = logits.argmax(1), ref.argmax(1)
    agree = float((top_ort == top_ref).mean())
    # A different top-1 is only excused where PyTorch's two logits tie within the tolerance (either
    # answer is then right); any other disagreement fails, whatever the logit difference.
    rows = np.arange(len(ref))
    real_flip = (top_ort != top_ref) & (ref[rows, top_ref] - ref[rows, top_ort] > 2 * tol)
    if not (diff <= tol and prob_diff <= atol) or real_flip.any():
        raise ParityError(
            f"{onnx_path}: ONNX Runtime does not match PyTorch: max |logit difference| {diff:.3g} "
            f"(allowed {tol:.3g}), max |probability difference| {prob_diff:.3g}, top-1 agreement "
            f"{agree:.1%} on {len(x)} inputs"
        )
    return diff, agree, len(x)
