"""The evaluation's plots: the confusion matrix, the misclassified drawings and the reliability
diagram, each written to a PNG. matplotlib is imported when a plot is made, and only its
``Figure`` (rendered by Agg): no pyplot, no global backend, no GUI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sketchsweep.calibration import Reliability

FULL_MATRIX_MAX = 30  # up to this many classes the whole labelled matrix is drawn


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


def plot_reliability(rel: Reliability, path: Path) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal of a calibrated model,
    the gap to each bin's mean confidence shaded, and below it how many images each bin holds."""
    fig = _figure(6, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    width = np.diff(rel.edges)
    filled = rel.count > 0
    left, acc, conf = rel.edges[:-1][filled], rel.accuracy[filled], rel.confidence[filled]
    top.bar(left, acc, width[filled], align="edge", color="tab:blue", edgecolor="white", label="accuracy")
    # The gap from accuracy to the bin's mean confidence, hatched: above the bar where the model is
    # overconfident, across its top where it is underconfident.
    top.bar(
        left, conf - acc, width[filled], bottom=acc, align="edge", fill=False, hatch="///", edgecolor="tab:red",
        linewidth=0.8, label="gap to mean confidence",
    )  # fmt: skip
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.legend(loc="upper left", fontsize=8)
    n = int(rel.count.sum())
    right = int(np.rint((rel.accuracy[filled] * rel.count[filled]).sum())) if n else 0
    top.set_title(
        f"Reliability diagram: ECE {rel.ece:.4f} ({len(rel.count)} bins)\n"
        f"top-1 accuracy {right / max(n, 1):.1%} on {n:,} images",
        fontsize=10,
    )
    bottom.bar(rel.edges[:-1], rel.count / max(n, 1), width, align="edge", color="gray", edgecolor="white")
    for x, w, c in zip(rel.edges[:-1], width, rel.count, strict=True):
        if c:
            label = str(c) if c < 10_000 else f"{c / 1000:.0f}k"
            bottom.text(x + w / 2, c / max(n, 1), label, ha="center", va="bottom", fontsize=7)
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="share of images", ylim=(0, 1.25))
    fig.savefig(path, dpi=100)
