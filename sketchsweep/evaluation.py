"""Evaluate a trained SketchCNN: top-1/3/5 accuracy, per-class accuracy, the most confused pairs,
a confusion-matrix plot and a grid of misclassified drawings.

``evaluation_artifacts`` is what training calls at the end of a run and what
``python -m sketchsweep.evaluate`` calls on any model and data.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sketchsweep.cli import UserError
from sketchsweep.data.views import Rows
from sketchsweep.engine import MixedPrecision, infer, resolve_precision

PER_CLASS = "per_class_accuracy.csv"
CONFUSED_PAIRS = "confused_pairs.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
METRICS_JSON = "metrics.json"
FILES = (PER_CLASS, CONFUSED_PAIRS, CONFUSION_CSV, CONFUSION_PNG, MISCLASSIFIED_PNG, METRICS_JSON)
TOPK = (1, 3, 5)
FULL_MATRIX_MAX = 30  # up to this many classes the whole labelled matrix is drawn
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
) -> Predictions:
    """Top-``k`` classes and top-1 confidence for every image, in batches on ``rows.device``.

    Results stay on the device until the end: one transfer, not a sync per batch."""
    if len(rows) == 0:
        raise EvalError("no images to evaluate")
    was_training = model.training
    tops, confs = [], []
    try:
        for logits, _ in infer(model, _checked(rows.batches(batch_size)), _precision(precision, rows.device)):
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
) -> dict[str, float]:
    """Evaluate ``model`` on uint8 ``images`` ``(N, 784)`` with ``labels`` (indices into
    ``class_names``; None when ``images`` is ``Rows`` with labels) and write the evaluation files
    into ``out_dir``:

    - ``per_class_accuracy.csv``: class, n, correct, accuracy, top3_accuracy, most_confused_with, confused_count
    - ``confused_pairs.csv``: the 20 most frequent (true, predicted) mistakes, with their share of the true class
    - ``confusion_matrix.csv``: raw counts, rows true and columns predicted, labelled
    - ``confusion_matrix.png``: the whole matrix up to 30 classes, else the least accurate classes and their confusions
    - ``misclassified.png``: up to 64 misclassified drawings with their true and predicted class
    - ``metrics.json``: the returned metrics

    Returns ``{eval_top1, eval_top3, eval_top5, eval_images}``. ``device``: where the model runs
    (None: the model's device), batches are moved there; ``precision``: fp32 when None, else
    ``auto``/``bf16``/... or an engine ``MixedPrecision``. The model's train/eval mode is restored.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    try:
        rows = as_rows(images, labels, device)
    except ValueError as e:  # images and labels of different lengths
        raise EvalError(str(e)) from None
    if rows.labels is None:
        raise EvalError("labels: expected one class index per image")
    y, c = rows.labels.numpy(), len(class_names)
    if len(y) and (y.min() < 0 or y.max() >= c):
        raise EvalError(f"labels must be class indices in [0, {c}); got values in [{y.min()}, {y.max()}]")
    pred = predict(model, rows, batch_size, precision)
    if pred.topk.shape[1] != min(max(TOPK), c):
        raise EvalError(f"the model has {pred.topk.shape[1]} outputs but {c} class names were given")
    hits = pred.topk == y[:, None]
    metrics = {f"eval_top{k}": float(hits[:, :k].any(axis=1).mean()) for k in TOPK}
    metrics["eval_images"] = float(len(y))

    confusion = confusion_matrix(y, pred.topk[:, 0], c)
    top3_hits = np.bincount(y, weights=hits[:, :3].any(axis=1), minlength=c)
    write_per_class(confusion, top3_hits, class_names, out / PER_CLASS)
    write_confused_pairs(confusion, class_names, out / CONFUSED_PAIRS)
    with open(out / CONFUSION_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *class_names])
        w.writerows([name, *row] for name, row in zip(class_names, confusion.tolist(), strict=True))
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
    (out / METRICS_JSON).write_text(json.dumps({**metrics, "classes": c}, indent=1) + "\n")
    return metrics


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


# -- plots -----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # A bare Figure renders with Agg without pyplot: no global backend switch, no GUI, no leaks.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def confusion_view(confusion: np.ndarray, max_classes: int = FULL_MATRIX_MAX) -> tuple[np.ndarray, str]:
    """Which classes the plot shows, in order, and a subtitle saying how they were chosen.

    Up to ``max_classes`` classes: all of them, in class order. More: the least accurate classes
    and the classes they are most often mistaken for, ordered by accuracy (worst first), so the
    plot stays a readable ~30x30 whatever the number of classes."""
    c = len(confusion)
    if c <= max_classes:
        return np.arange(c), f"all {c} classes"
    n = confusion.sum(axis=1)
    present = np.flatnonzero(n)
    acc = np.diag(confusion)[present] / n[present]
    n_worst = min(len(present), (2 * max_classes) // 3)
    worst = present[np.argsort(acc, kind="stable")[:n_worst]]
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    chosen = list(worst)
    for rank in range(2):  # each worst class's first, then second, most frequent confusion
        for i in worst:
            j = int(np.argsort(-off[i], kind="stable")[rank])
            if off[i, j] and j not in chosen and len(chosen) < max_classes:
                chosen.append(j)
    chosen_arr = np.array(chosen)
    n_c = np.maximum(n[chosen_arr], 1)
    chosen_arr = chosen_arr[np.argsort(np.diag(confusion)[chosen_arr] / n_c, kind="stable")]
    return chosen_arr, f"the {n_worst} least accurate of {c} classes and what they are mistaken for"


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    """Row-normalized confusion matrix (share of each true class), with a square-root colour scale
    so that confusions of a few percent are visible next to a bright diagonal."""
    from matplotlib.colors import PowerNorm

    sel, subtitle = confusion_view(confusion)
    n = confusion.sum(axis=1)
    sub = confusion[np.ix_(sel, sel)]
    rates = sub / np.maximum(n[sel], 1)[:, None]
    m = len(sel)
    side = max(5.0, 0.28 * m + 2.5)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    acc = np.diag(confusion)[sel] / np.maximum(n[sel], 1)
    ax.set_xticks(range(m), [_short(class_names[i]) for i in sel], rotation=90, fontsize=8)
    ax.set_yticks(range(m), [f"{_short(class_names[i])} ({a:.0%})" for i, a in zip(sel, acc, strict=True)], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (accuracy)")
    total = confusion.sum()
    ax.set_title(
        f"Confusion matrix: {subtitle}\ntop-1 accuracy {np.trace(confusion) / max(total, 1):.1%} on {total:,} images",
        fontsize=10,
    )
    if m <= 20:  # counts stay legible up to ~20x20
        for i, j in zip(*np.nonzero(sub), strict=True):
            ax.text(
                j,
                i,
                str(sub[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    fig.savefig(path, dpi=100)


def plot_misclassified(
    images: np.ndarray,
    true_names: list[str],
    pred_names: list[str],
    confidence: np.ndarray,
    path: Path,
    total_wrong: int | None = None,
    cols: int = 8,
) -> None:
    """The drawings in one mosaic image (dark strokes on white), each labelled true / predicted.

    One ``imshow`` and a text per tile: ~10x faster than 64 subplots."""
    count = len(images)
    if count == 0:
        fig = _figure(6, 1.5)
        fig.text(0.5, 0.5, "no misclassified drawings", ha="center", va="center", fontsize=14)
        fig.savefig(path, dpi=100)
        return
    cols = min(cols, count)
    rows = -(-count // cols)
    cell_w, cell_h, gap = 32, 42, 2  # pixels of the mosaic; the label band sits under each drawing
    mosaic = np.full((rows * cell_h, cols * cell_w), 255, np.uint8)
    tiles = 255 - images.reshape(-1, 28, 28)
    for k in range(count):
        r, c = divmod(k, cols)
        mosaic[r * cell_h + gap : r * cell_h + gap + 28, c * cell_w + gap : c * cell_w + gap + 28] = tiles[k]
    fig = _figure(cols * 1.45, rows * 1.45 * cell_h / cell_w + 0.5)
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    for k in range(count):
        r, c = divmod(k, cols)
        x, y = c * cell_w + gap + 14, r * cell_h + gap + 29
        ax.text(x, y, _short(true_names[k], 16), ha="center", va="top", fontsize=7, color="black")
        ax.text(
            x,
            y + 5.5,
            f"→ {_short(pred_names[k], 13)} {confidence[k]:.0%}",
            ha="center",
            va="top",
            fontsize=7,
            color="red",
        )
    shown = f"{count} of {total_wrong}" if total_wrong is not None else str(count)
    ax.set_title(f"Misclassified drawings ({shown}): true class, → predicted (confidence)", fontsize=10)
    fig.savefig(path, dpi=100)
