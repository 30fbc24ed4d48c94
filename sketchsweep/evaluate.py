"""Evaluate a trained model on its run's split or on other data (``sketchsweep.evaluation`` writes
the files).

    python -m sketchsweep.evaluate outputs/2026-11-24/10-00-00          # the run's validation split
    python -m sketchsweep.evaluate runs:/<run_id> --log                  # ... logged to the MLflow run
    python -m sketchsweep.evaluate models:/sketches@champion             # a Model Registry version
    python -m sketchsweep.evaluate RUN data=quickdraw data.root=PATH     # other data: all of its rows
    python -m sketchsweep.evaluate RUN --tta                             # also test-time augmentation

The model comes from ``checkpoint.load_trained``; the data (``sketchsweep.run_data``) from the
run's own config and split (read with training's loader, so its top-1 is the run's
``best_val_acc``), or Hydra data overrides applied to it. ``--tta`` also scores test-time
augmentation (``sketchsweep.tta.SHIFTS``: the drawing and 4 one-pixel shifts, logits averaged).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sketchsweep import cli
from sketchsweep.checkpoint import TrainedModel, load_trained
from sketchsweep.engine import pick_device
from sketchsweep.evaluation import EvalError, evaluation_artifacts
from sketchsweep.modelref import PYTORCH_FORMS, ModelRef
from sketchsweep.run_data import load_target
from sketchsweep.tta import SHIFTS

# The user's input being wrong, besides sketchsweep's own (cli.UserError, which MLflow's errors
# become in sketchsweep.store): one line, exit code 2.
BAD_INPUT = (cli.UserError, HydraException, OmegaConfBaseException, OSError)


def log_to_mlflow(trained: TrainedModel, ref: ModelRef, out: Path, metrics: dict[str, float], name: str) -> str:
    """Log the files (under ``name``) and the metrics to the model's MLflow run; returns the store URI."""
    from sketchsweep import store, tracking  # MLflow: only when logging

    # runs:/ and models:/ were found in the default store; a run folder's config says where it logged.
    configured = None if ref.remote else (trained.config.get("mlflow") or {}).get("tracking_uri")
    uri = tracking.tracking_uri(configured)
    store.log_to_run(trained.run_id, uri, out, name, metrics)
    return uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sketchsweep.evaluate",
        description="Evaluate a trained model: top-1/3/5 and per-class accuracy, calibration (ECE), confusions, plots.",
        epilog="Examples:  %(prog)s outputs/2026-11-24/10-00-00   |   %(prog)s runs:/<run_id> --log   |   "
        "%(prog)s RUN data=quickdraw data.root=PATH 'data.classes=[cat,dog]'",
    )
    parser.add_argument("model", help=PYTORCH_FORMS)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra data overrides (data=quickdraw data.root=PATH data.classes=[...]): evaluate on all rows of "
        "that data instead of the run's split; classes are matched by name to the model's",
    )
    parser.add_argument("--split", choices=("val", "test", "train", "all"), default="val", help="without overrides")
    parser.add_argument("--out", type=Path, help="output folder (default: <run folder>/evaluation[-<data>])")
    parser.add_argument("--log", action="store_true", help="also log the files and metrics to the model's MLflow run")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="also score test-time augmentation: the drawing and its 1-pixel shifts right, left, down and up "
        "(5 views), logits averaged; reported beside the plain scores as tta_*",
    )
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise EvalError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.overrides and args.split != "val":
        raise EvalError("--split applies to the run's own data; with data overrides every row is evaluated")
    ref = ModelRef.parse(args.model)
    trained = load_trained(ref)
    if args.log and trained.run_id is None:
        raise EvalError(
            f"{args.model}: no MLflow run is known for this model (no checkpoint with a run id); drop --log"
        )
    device = pick_device(args.device, key="--device")
    target = load_target(trained, ref, args.overrides, args.split, device)
    name = "evaluation" + (f"-{target.label}" if target.label else "")
    out = args.out or (ref.folder / name if ref.folder is not None else Path(f"{name}-{trained.run_id}"))
    precision = str((trained.config.get("trainer") or {}).get("precision") or "auto")
    metrics = evaluation_artifacts(
        trained.model.to(device), target.rows, None, trained.class_names, out, args.batch_size, device, precision,
        SHIFTS if args.tta else None,
    )  # fmt: skip
    classes = len(trained.class_names)
    print(f"{target.description}: {_scores(metrics, 'eval_')}  ({classes} classes, model {trained.source})")
    if args.tta:
        print(f"with test-time augmentation ({len(SHIFTS)} views: 1-pixel shifts): {_scores(metrics, 'eval_tta_')}")
    print(f"files: {out}")
    if args.log:
        prefix = f"eval_{target.label.replace('-', '_')}_" if target.label else "eval_"
        logged = {prefix + k[len("eval_") :]: v for k, v in metrics.items()}
        uri = log_to_mlflow(trained, ref, out, logged, name)
        print(f"logged to MLflow run {trained.run_id} at {uri}: {', '.join(logged)} and artifacts {name}/")


def _scores(metrics: dict[str, float], prefix: str) -> str:
    top = "  ".join(f"top-{k} {metrics[f'{prefix}top{k}']:.4f}" for k in (1, 3, 5))
    return f"{top}  ECE {metrics[f'{prefix}ece']:.4f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BAD_INPUT as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
