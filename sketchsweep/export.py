"""Export a trained SketchCNN to ONNX, with the preprocessing inside the graph and parity checked.

    python -m sketchsweep.export outputs/2026-11-24/10-00-00              # -> outputs/2026-11-24/10-00-00/model.onnx
    python -m sketchsweep.export outputs/.../checkpoint.pt --out sketch.onnx --opset 20
    python -m sketchsweep.export runs:/<run_id>                           # -> ./model.onnx
    python -m sketchsweep.export models:/sketches@champion                # -> ./model.onnx
    python -m sketchsweep.export outputs/2026-11-24/10-00-00 --calibrate  # temperature fitted on its validation split

The exported model's contract (``onnx_model.INPUT_CONTRACT``, also stored in the file's metadata):
input ``images`` uint8 ``(N, 28, 28)`` in the Quick, Draw! numpy_bitmap format (strokes 255 on
background 0), any N; outputs ``logits`` and ``probabilities`` (softmax), float32 ``(N, classes)``.
The cast to float and Normalize(0.5, 0.5) happen inside the graph, so a deployment cannot get
the scaling wrong. Every export is checked by ONNX Runtime against PyTorch before it is kept.
``--calibrate`` fits a temperature on the run's validation split and divides the logits by it
inside the graph, so ``probabilities`` are calibrated (metadata ``temperature``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf.errors import OmegaConfBaseException

from sketchsweep import cli
from sketchsweep.calibration import ECE_BINS, at_bound, expected_calibration_error, fit_temperature
from sketchsweep.checkpoint import TrainedModel, load_trained
from sketchsweep.config import saved_data_config
from sketchsweep.data import DataError
from sketchsweep.data.categories import class_key
from sketchsweep.data.folder import list_class_files
from sketchsweep.data.load import is_synthetic, synthetic_folder
from sketchsweep.data.synthetic import SHAPES, draw_class
from sketchsweep.engine import all_logits, pick_device
from sketchsweep.modelref import BEST_WEIGHTS, PYTORCH_FORMS, ModelRef
from sketchsweep.onnx_export import DEFAULT_NAME, ExportError, as_batch, export_onnx


def _data_root(config: dict) -> str | Path | None:
    """Where the run read its data (None when its config does not say, or no longer reads)."""
    if not config.get("data"):
        return None
    try:
        data = saved_data_config(config)
    except OmegaConfBaseException:  # a config from another version: the check draws sketches instead
        return None
    return synthetic_folder(data) if is_synthetic(data) else data.root


def sample_real_images(trained: TrainedModel, per_class: int = 2, max_classes: int = 16) -> tuple[np.ndarray, str]:
    """A few drawings to check parity on: the run's own data files when they are still where the
    run read them, else synthetic sketches (sketch-like, unlike random pixels)."""
    rows, root = [], _data_root(trained.config)
    if root and Path(root).is_dir():
        wanted = {class_key(c) for c in trained.class_names[:max_classes]}
        try:
            files = list_class_files(root)
        except DataError:
            files = {}
        for name, f in files.items():
            if class_key(name) not in wanted:
                continue
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
                rows.append(as_batch(np.array(a[:per_class])))
            except (OSError, ValueError, ExportError):
                continue  # a file that moved or changed: the check just uses fewer real drawings
    if rows:
        return np.concatenate(rows), f"{sum(len(r) for r in rows)} drawings from {root}"
    names = [c for c in trained.class_names if c in SHAPES] or list(SHAPES)
    drawn = np.concatenate([draw_class(n, per_class, seed=1234) for n in names[:max_classes]])
    return drawn.reshape(-1, 28, 28), f"{len(drawn)} synthetic sketches"


def default_out(ref: str | ModelRef) -> Path:
    """``<run folder>/model.onnx`` for a run folder or a file in one; ``./model.onnx`` for runs:/
    and models:/. Other weights than the best epoch's (``model_weights.pth``) get their own name, so
    they do not replace the ``model.onnx`` training exported from the best epoch."""
    ref = ModelRef.parse(ref)
    if ref.folder is None:
        return Path(DEFAULT_NAME)
    if ref.kind == "weights" and ref.path.name != BEST_WEIGHTS:
        return ref.path.with_suffix(".onnx")
    return ref.folder / DEFAULT_NAME


class CalibrationError(cli.UserError):
    """``--calibrate`` for a model whose validation split cannot be read (CLI exit code 2)."""


@dataclass
class Calibration:
    temperature: float
    ece_before: float  # on the validation split, 15 bins
    ece_after: float
    split: str  # which images, for the report: "the validation split (1,234)"


def calibrate(trained: TrainedModel, ref: ModelRef, batch_size: int = 1024) -> Calibration:
    """Fit a temperature to ``trained``'s logits (fp32, on the GPU when there is one) on its run's
    validation split, read as ``python -m sketchsweep.evaluate`` reads it; a split that cannot be
    read is a ``CalibrationError`` naming what is missing; one that no temperature fits (every
    drawing right: the NLL falls as T -> 0) an ``ExportError``. Writes nothing."""
    if not trained.config.get("data"):
        raise CalibrationError(
            f"--calibrate: {ref.text} has no validation split to fit a temperature on: no data config is known for "
            "it (export the run folder, checkpoint or runs:/ that trained it)"
        )
    from sketchsweep.run_data import load_target  # Hydra and the data loader: only to calibrate

    device = pick_device("auto")
    try:
        target = load_target(trained, ref, [], "val", device)
    except (cli.UserError, OmegaConfBaseException, OSError) as e:
        raise CalibrationError(f"--calibrate needs the validation split of {ref.text}: {cli.message(e)}") from None
    try:
        logits, labels = all_logits(trained.model.to(device), target.rows.to(device), batch_size)
    finally:
        trained.model.cpu()
    temperature = fit_temperature(logits, labels)
    y = labels.cpu().numpy()
    if at_bound(temperature):
        # At a bound the split says nothing about the temperature: exporting T = 0.01 would make every probability 1.
        if temperature > 1:
            why = "the model does no better than chance there"
        elif (logits.argmax(1) == labels).all():
            why = "every drawing there is classified right"
        else:
            why = "the model is right on nearly every drawing there, by wide margins"
        raise ExportError(
            f"--calibrate: no temperature fits {target.description}: {why}, so the best temperature is the search's "
            f"bound ({temperature:.3g}); export without --calibrate, or calibrate on a run with more validation data"
        )
    before = expected_calibration_error(logits.softmax(1).cpu().numpy(), y, ECE_BINS)
    after = expected_calibration_error((logits / temperature).softmax(1).cpu().numpy(), y, ECE_BINS)
    return Calibration(temperature, before, after, target.description)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sketchsweep.export",
        description="Export a trained SketchCNN to ONNX (uint8 (N, 28, 28) in; logits and probabilities out), "
        "checked against PyTorch by ONNX Runtime.",
    )
    parser.add_argument("model", help=PYTORCH_FORMS)
    parser.add_argument(
        "--out",
        type=Path,
        help=f"the .onnx file (default: <run folder>/{DEFAULT_NAME}, <name>.onnx beside another *.pth; "
        f"./{DEFAULT_NAME} for runs:/ and models:/)",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset, 17 or newer (default: the exporter's)")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="fit a temperature on the run's validation split and divide the logits by it in the graph "
        "(calibrated probabilities; metadata 'temperature')",
    )
    args = parser.parse_args(argv)
    out = args.out
    try:
        ref = ModelRef.parse(args.model)
        out = out or default_out(ref)
        trained = load_trained(ref)
        calibration = calibrate(trained, ref) if args.calibrate else None
        real, where = sample_real_images(trained)
        t = calibration.temperature if calibration else 1.0
        report = export_onnx(trained, out, opset=args.opset, real_images=real, temperature=t)
    except cli.UserError as e:  # a bad reference, --out or --opset
        return cli.fail(e)
    except ExportError as e:
        return cli.fail(f"export failed, nothing written to {out}: {e}", cli.FAILURE)
    size = report.path.stat().st_size / 1e6
    print(
        f"wrote {report.path} ({size:.2f} MB, opset {report.opset}, {len(trained.class_names)} classes) in "
        f"{report.seconds:.1f} s; ONNX Runtime matches PyTorch on {report.num_checked} inputs ({where} + random): "
        f"max |logit difference| {report.max_abs_diff:.2g}, top-1 agreement {report.top1_agree:.0%}"
    )
    if calibration:
        print(
            f"calibrated on {calibration.split}: temperature {calibration.temperature:.4f} (logits divided by it in "
            f"the graph); ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f} ({ECE_BINS} bins)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
