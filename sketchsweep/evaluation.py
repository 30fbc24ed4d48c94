"""Evaluate a trained SketchCNN: top-1/3/5 accuracy, calibration (ECE), per-class accuracy, the
most confused pairs, and plots (``sketchsweep.plots``): the confusion matrix, misclassified
drawings and a reliability diagram; optionally the same scores with test-time augmentation.

``evaluation_artifacts`` is what training calls at the end of a run and what
``python -m sketchsweep.evaluate`` calls on any model and data.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sketchsweep.calibration import ECE_BINS, reliability
from sketchsweep.cli import UserError
from sketchsweep.data.views import Rows
from sketchsweep.engine import MixedPrecision, infer, resolve_precision
from sketchsweep.plots import plot_confusion, plot_misclassified, plot_reliability
from sketchsweep.tta import infer_tta

PER_CLASS = "per_class_accuracy.csv"
CONFUSED_PAIRS = "confused_pairs.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
RELIABILITY_PNG = "reliability.png"
METRICS_JSON = "metrics.json"
FILES = (PER_CLASS, CONFUSED_PAIRS, CONFUSION_CSV, CONFUSION_PNG, MISCLASSIFIED_PNG, RELIABILITY_PNG, METRICS_JSON)
TOPK = (1, 3, 5)
N_PAIRS = 20
N_MISCLASSIFIED = 64


class EvalError(UserError):
    """A problem with what was asked to evaluate (classes, splits, overrides)."""


# -- prediction ------------------------------------------------------------------------------


@dataclass
class Predictions:
    topk: np.ndarray  # int64 (N, k): class indices, most likely first (k = min(5, classes))
    confidence: np.ndarray  # float32 (N,): softmax probability of the top-1 class


def _precision(precision: MixedPrecision | str | None, device: torch.device) -> MixedPrecision:
    if precision is None:
        return MixedPrecision()
    return resolve_precision(precision, device) if isinstance(precision, str) else precision


def as_rows(images: np.ndarray | torch.Tensor | Rows, labels=None, device: torch.device | str | None = None) -> Rows:
    """``images`` (uint8 ``(N, 784)``, NumPy or a tensor on any device, or ``Rows``) with ``labels``
    (None: the ``Rows``' own) as ``Rows`` delivering to ``device`` (None: where they are)."""
    labels = None if labels is None else np.asarray(torch.as_tensor(labels).cpu())
    if isinstance(images, Rows):
        labels = images.labels if labels is None else labels
        return Rows(images.images, labels, images.index, device if device is not None else images.device)
    return Rows(images, labels, device=device)


def predict(
    model: nn.Module,
    rows: Rows,
    batch_size: int = 1024,
    precision: MixedPrecision | str | None = None,
    k: int = max(TOPK),
    shifts: Sequence[tuple[int, int]] | None = None,
) -> Predictions:
    """Top-``k`` classes and top-1 confidence for every image, in batches on ``rows.device``; with
    ``shifts``, of the logits averaged over those views (``sketchsweep.tta``; batches are made that
    many times smaller, so the model still sees about ``batch_size`` images at once).

    Results stay on the device until the end: one transfer, not a sync per batch."""
    if len(rows) == 0:
        raise EvalError("no images to evaluate")
    was_training = model.training
    tops, confs = [], []
    precision = _precision(precision, rows.device)
    if shifts:
        batches = _checked(rows.batches(max(1, batch_size // len(shifts))))
        inferred = infer_tta(model, batches, precision, shifts)
    else:
        inferred = infer(model, _checked(rows.batches(batch_size)), precision)
    try:
        for logits, _ in inferred:
            p, idx = logits.softmax(dim=1).topk(min(k, logits.shape[1]), dim=1)
            tops.append(idx)
            confs.append(p[:, 0])
    finally:
        model.train(was_training)
    return Predictions(torch.cat(tops).cpu().numpy(), torch.cat(confs).float().cpu().numpy())


def _checked(batches):
    for images, labels in batches:
        if images.dtype != torch.uint8:
            raise EvalError(f"images: expected uint8 rows of 784 pixels, got {images.dtype}")
        yield images, labels


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` as int64 ``(C, C)``: one ``bincount``, no loop over images."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


# -- the artifacts ---------------------------------------------------------------------------


def evaluation_artifacts(
    model: nn.Module,
    images: np.ndarray | torch.Tensor | Rows,
    labels: np.ndarray | torch.Tensor | None,
    class_names: list[str],
    out_dir: str | Path,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    precision: MixedPrecision | str | None = None,
    tta: Sequence[tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on uint8 ``images`` ``(N, 784)`` with ``labels`` (indices into
    ``class_names``; None when ``images`` is ``Rows`` with labels) and write the evaluation files
    into ``out_dir``:

    - ``per_class_accuracy.csv``: class, n, correct, accuracy, top3_accuracy, most_confused_with, confused_count
    - ``confused_pairs.csv``: the 20 most frequent (true, predicted) mistakes, with their share of the true class
    - ``confusion_matrix.csv``: raw counts, rows true and columns predicted, labelled
    - ``confusion_matrix.png``: the whole matrix up to 30 classes, else the least accurate classes and their confusions
    - ``misclassified.png``: up to 64 misclassified drawings with their true and predicted class
    - ``reliability.png``: accuracy per confidence bin against the diagonal, with the bins' counts
    - ``metrics.json``: the returned metrics

    Returns ``{eval_top1, eval_top3, eval_top5, eval_ece, eval_images}`` (ECE over 15 bins); with
    ``tta`` (shifts, e.g. ``sketchsweep.tta.SHIFTS``) also ``eval_tta_top1/3/5`` and ``eval_tta_ece``
    of the logits averaged over those views (the files stay the plain model's). ``device``: where
    the model runs (None: the model's device), batches are moved there; ``precision``: fp32 when
    None, else ``auto``/``bf16``/... or an engine ``MixedPrecision``. The model's train/eval mode
    is restored.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    rows = _labelled_rows(images, labels, len(class_names), device)
    y, c = rows.labels.numpy(), len(class_names)
    pred = predict(model, rows, batch_size, precision)
    if pred.topk.shape[1] != min(max(TOPK), c):
        raise EvalError(f"the model has {pred.topk.shape[1]} outputs but {c} class names were given")
    metrics = scores(pred, y, "eval_")
    metrics["eval_images"] = float(len(y))
    if tta:
        metrics |= scores(predict(model, rows, batch_size, precision, shifts=tta), y, "eval_tta_")

    confusion = confusion_matrix(y, pred.topk[:, 0], c)
    top3_hits = np.bincount(y, weights=(pred.topk[:, :3] == y[:, None]).any(axis=1), minlength=c)
    write_per_class(confusion, top3_hits, class_names, out / PER_CLASS)
    write_confused_pairs(confusion, class_names, out / CONFUSED_PAIRS)
    write_confusion(confusion, class_names, out / CONFUSION_CSV)
    plot_confusion(confusion, class_names, out / CONFUSION_PNG)
    wrong = pick_misclassified(y, pred.topk[:, 0], pred.confidence, N_MISCLASSIFIED)
    plot_misclassified(
        rows.take(wrong).cpu().numpy() if len(wrong) else np.zeros((0, 784), np.uint8),
        [class_names[i] for i in y[wrong]],
        [class_names[i] for i in pred.topk[wrong, 0]],
        pred.confidence[wrong],
        out / MISCLASSIFIED_PNG,
        total_wrong=int((pred.topk[:, 0] != y).sum()),
    )
    plot_reliability(reliability(pred.confidence, pred.topk[:, 0] == y, ECE_BINS), out / RELIABILITY_PNG)
    (out / METRICS_JSON).write_text(json.dumps({**metrics, "classes": c}, indent=1) + "\n")
    return metrics


def _labelled_rows(images, labels, num_classes: int, device: torch.device) -> Rows:
    """``images`` and ``labels`` as ``Rows`` on ``device``, the labels checked against the classes."""
    try:
        rows = as_rows(images, labels, device)
    except ValueError as e:  # images and labels of different lengths
        raise EvalError(str(e)) from None
    if rows.labels is None:
        raise EvalError("labels: expected one class index per image")
    y = rows.labels.numpy()
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise EvalError(f"labels must be class indices in [0, {num_classes}); got values in [{y.min()}, {y.max()}]")
    return rows


def scores(pred: Predictions, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """``<prefix>top1``/``top3``/``top5`` accuracy and ``<prefix>ece`` (15 bins) of ``pred``."""
    hits = pred.topk == labels[:, None]
    metrics = {f"{prefix}top{k}": float(hits[:, :k].any(axis=1).mean()) for k in TOPK}
    metrics[f"{prefix}ece"] = reliability(pred.confidence, hits[:, 0], ECE_BINS).ece
    return metrics


def write_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    """Raw counts, rows true and columns predicted, labelled."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *class_names])
        w.writerows([name, *row] for name, row in zip(class_names, confusion.tolist(), strict=True))


def write_per_class(confusion: np.ndarray, top3_hits: np.ndarray, class_names: list[str], path: Path) -> None:
    """One row per class with images; accuracy is blank for classes the data does not contain."""
    n = confusion.sum(axis=1)
    correct = np.diag(confusion)
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    worst = off.argmax(axis=1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "n", "correct", "accuracy", "top3_accuracy", "most_confused_with", "confused_count"])
        for i, name in enumerate(class_names):
            if n[i] == 0:
                continue
            confused = int(off[i, worst[i]])
            w.writerow(
                [
                    name,
                    int(n[i]),
                    int(correct[i]),
                    f"{correct[i] / n[i]:.4f}",
                    f"{top3_hits[i] / n[i]:.4f}",
                    class_names[worst[i]] if confused else "",
                    confused,
                ]
            )


def write_confused_pairs(confusion: np.ndarray, class_names: list[str], path: Path, limit: int = N_PAIRS) -> None:
    """The ``limit`` most frequent mistakes, largest count first (ties: larger share of the true class)."""
    n = confusion.sum(axis=1)
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    t, p = np.nonzero(off)
    counts = off[t, p]
    share = counts / n[t]
    order = np.lexsort((p, t, -share, -counts))[:limit]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true", "predicted", "count", "fraction_of_true"])
        w.writerows([class_names[t[i]], class_names[p[i]], int(counts[i]), f"{share[i]:.4f}"] for i in order)


def pick_misclassified(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, limit: int) -> np.ndarray:
    """Up to ``limit`` mistakes, spread over the true classes: each class's most confident mistake
    first, then each class's second, ... (the most confident alone would often be one class).
    Returned grouped by true class, most confident first."""
    wrong = np.flatnonzero(predicted != labels)
    if len(wrong) == 0:
        return wrong
    order = wrong[np.lexsort((-confidence[wrong], labels[wrong]))]
    cls = labels[order]
    starts = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    chosen = order[np.argsort(rank, kind="stable")[:limit]]
    return chosen[np.lexsort((-confidence[chosen], labels[chosen]))]
