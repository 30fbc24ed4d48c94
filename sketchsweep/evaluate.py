"""Evaluate a trained SketchCNN: top-1/3/5 accuracy, per-class accuracy, the most confused pairs,
a confusion-matrix plot and a grid of misclassified drawings.

    python -m sketchsweep.evaluate outputs/2026-11-24/10-00-00          # the run's validation split
    python -m sketchsweep.evaluate runs:/<run_id> --log                  # ... logged to the MLflow run
    python -m sketchsweep.evaluate RUN data=quickdraw data.root=PATH     # other data: all of its rows

``evaluation_artifacts`` is the API training calls at the end of a run; the CLI finds the model
(``sketchsweep.checkpoint.load_trained``) and the data (the run's own config and split, or data
overrides applied to it) and calls it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sketchsweep.data.categories import class_key, suggest
from sketchsweep.engine import Precision, resolve_precision, to_input

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


class EvalError(ValueError):
    """A problem with what was asked to evaluate (classes, splits, overrides)."""


# -- prediction ------------------------------------------------------------------------------


@dataclass
class Predictions:
    topk: np.ndarray  # int64 (N, k): class indices, most likely first (k = min(5, classes))
    confidence: np.ndarray  # float32 (N,): softmax probability of the top-1 class


class Rows:
    """Rows ``index`` of an image source (a NumPy array, a tensor or a streaming ``RowReader``),
    read batch by batch, so a subset of data that does not fit in memory is never copied whole."""

    def __init__(self, source: Any, index: np.ndarray | torch.Tensor | None = None) -> None:
        self.source = source
        self.index = index.cpu().numpy() if isinstance(index, torch.Tensor) else index

    def __len__(self) -> int:
        return len(self.source) if self.index is None else len(self.index)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """Rows at positions ``idx`` (of this view) as a uint8 tensor ``(len(idx), 784)``."""
        rows = idx if self.index is None else self.index[idx]
        if isinstance(self.source, torch.Tensor):
            return self.source[torch.as_tensor(rows, device=self.source.device)].reshape(-1, 784)
        if hasattr(self.source, "gather"):  # a RowReader: read just these rows, not the spans between them
            return torch.from_numpy(self.source.gather(rows))
        return torch.from_numpy(np.ascontiguousarray(self.source[rows]).reshape(-1, 784))

    def batch(self, start: int, stop: int) -> torch.Tensor:
        if self.index is None and isinstance(self.source, (np.ndarray, torch.Tensor)):  # a view, no copy
            part = self.source[start:stop]
            part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(part))
            return part.reshape(-1, 784)
        return self.take(np.arange(start, min(stop, len(self))))


def _precision(precision: Precision | str | None, device: torch.device) -> Precision:
    if precision is None:
        return Precision()
    return resolve_precision(precision, device) if isinstance(precision, str) else precision


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: Any,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    precision: Precision | str | None = None,
    k: int = max(TOPK),
) -> Predictions:
    """Top-``k`` classes and top-1 confidence for every image, in batches on ``device``.

    Results stay on the device until the end: one transfer, not a sync per batch."""
    rows = images if isinstance(images, Rows) else Rows(images)
    if len(rows) == 0:
        raise EvalError("no images to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prec = _precision(precision, device)
    was_training = model.training
    model.eval()
    tops, confs = [], []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows.batch(start, start + batch_size)
            if batch.dtype != torch.uint8:
                raise EvalError(f"images: expected uint8 rows of 784 pixels, got {batch.dtype}")
            x = to_input(batch.to(device, non_blocking=True), prec.channels_last)
            with prec.autocast(device):
                logits = model(x).float()
            p, idx = logits.softmax(dim=1).topk(min(k, logits.shape[1]), dim=1)
            tops.append(idx)
            confs.append(p[:, 0])
    finally:
        model.train(was_training)
    return Predictions(torch.cat(tops).cpu().numpy(), torch.cat(confs).float().cpu().numpy())


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` as int64 ``(C, C)``: one ``bincount``, no loop over images."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


# -- the artifacts ---------------------------------------------------------------------------


def evaluation_artifacts(
    model: nn.Module,
    images: np.ndarray | torch.Tensor | Rows,
    labels: np.ndarray | torch.Tensor,
    class_names: list[str],
    out_dir: str | Path,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    precision: Precision | str | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on uint8 ``images`` ``(N, 784)`` with ``labels`` (indices into
    ``class_names``) and write the evaluation files into ``out_dir``:

    - ``per_class_accuracy.csv``: class, n, correct, accuracy, top3_accuracy, most_confused_with, confused_count
    - ``confused_pairs.csv``: the 20 most frequent (true, predicted) mistakes, with their share of the true class
    - ``confusion_matrix.csv``: raw counts, rows true and columns predicted, labelled
    - ``confusion_matrix.png``: the whole matrix up to 30 classes, else the least accurate classes and their confusions
    - ``misclassified.png``: up to 64 misclassified drawings with their true and predicted class
    - ``metrics.json``: the returned metrics

    Returns ``{eval_top1, eval_top3, eval_top5, eval_images}``. ``device``: the model's device
    when None; ``precision``: fp32 when None, else ``auto``/``bf16``/... or an engine ``Precision``.
    The model's train/eval mode is restored afterwards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = (labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)).astype(np.int64)
    rows = images if isinstance(images, Rows) else Rows(images)
    c = len(class_names)
    if len(y) != len(rows):
        raise EvalError(f"{len(rows)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= c):
        raise EvalError(f"labels must be class indices in [0, {c}); got values in [{y.min()}, {y.max()}]")
    pred = predict(model, rows, batch_size, device, precision)
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


# -- the command line ------------------------------------------------------------------------


@dataclass
class Target:
    """What the CLI evaluates: rows of a dataset, with labels in the model's class indices."""

    images: Rows
    labels: np.ndarray
    label: str  # "" for the run's validation split; else what the data is ("test", "qd-small", ...)
    description: str


def map_classes(data_classes: list[str], model_classes: list[str]) -> np.ndarray:
    """Index into the model's classes for each of the data's classes, matched by name."""
    known = {class_key(n): i for i, n in enumerate(model_classes)}
    unknown = [n for n in data_classes if class_key(n) not in known]
    if unknown:
        names = {k: model_classes[i] for k, i in known.items()}
        hints = []
        for name in unknown[:5]:
            hint = suggest(class_key(name), names)
            hints.append(f"{name!r}" + (f" ({hint})" if hint else ""))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        theirs = f": {', '.join(model_classes)}" if len(model_classes) <= 10 else " are in its classes.json"
        raise EvalError(
            f"the data has class(es) the model does not know: {', '.join(hints)}{more}; the model's "
            f"{len(model_classes)} classes{theirs} (pick known ones with data.classes=[...])"
        )
    return np.array([known[class_key(n)] for n in data_classes], dtype=np.int64)


def _run_folder(ref: str) -> Path | None:
    if ref.startswith("runs:/"):
        return None
    p = Path(ref).expanduser()
    return p if p.is_dir() else p.parent


def _data_group(data: dict[str, Any]) -> str:
    return "synthetic" if str(data.get("source", "synthetic")) == "synthetic" else "quickdraw"


def compose_data(run_config: dict[str, Any], overrides: list[str]):
    """The data config to evaluate on: Hydra data overrides applied to the run's own data config.

    ``data=<group>`` starts from that group's defaults, as in training; ``data.<key>=...`` alone
    changes the run's data config. Hydra's compose API parses and type-checks the overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sketchsweep.config import PROJECT_ROOT, DataConfig, register_configs

    bad = [o for o in overrides if not re.match(r"^[+~]?data(\.|=|$)", o)]
    if bad:
        raise EvalError(f"only data overrides are accepted (data=GROUP, data.KEY=VALUE); got {' '.join(bad)}")
    run_data = dict(run_config.get("data") or {})
    switch = any(re.match(r"^data=", o) for o in overrides)
    register_configs()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3", job_name="evaluate"):
        group = [] if switch or not run_data else [f"data={_data_group(run_data)}"]
        cfg = compose("config", overrides=[*group, *overrides])
    if switch or not run_data:
        return cfg.data
    base = OmegaConf.merge(OmegaConf.structured(DataConfig), run_data)
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        OmegaConf.update(base, key[len("data.") :], OmegaConf.select(cfg, key), merge=False)
    return base


def _data_label(data_cfg) -> str:
    if str(getattr(data_cfg.source, "value", data_cfg.source)) == "synthetic":
        return "synthetic"
    return re.sub(r"[^\w.-]+", "_", Path(str(data_cfg.root)).expanduser().resolve().name) or "data"


def _read_split(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].astype(np.int64) for k in ("train", "val", "test") if k in z}


def _split_indices(folder: Path | None, run_id: str | None, data, data_cfg) -> dict[str, np.ndarray]:
    """The run's split.npz (from its folder, or its MLflow run); recomputed from the run's data
    config if it is missing, which gives the same indices (the split depends only on it)."""
    from sketchsweep.data import stratified_split

    split, source = None, "split.npz"
    if folder is not None and (folder / "split.npz").is_file():
        split, source = _read_split(folder / "split.npz"), str(folder / "split.npz")
    elif folder is None and run_id is not None:
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="split.npz", dst_path=tmp)
                split, source = _read_split(Path(path)), f"split.npz of run {run_id}"
            except Exception:  # older runs may lack it: recompute below
                split = None
    if split is None:
        train, val, test = stratified_split(
            data.labels, data.class_names, data_cfg.val_fraction, data_cfg.split_seed, data_cfg.test_fraction
        )
        return {"train": train, "val": val, "test": test}
    if any(len(v) and v.max() >= len(data.labels) for v in split.values()):
        raise EvalError(
            f"{source}: indices go past the {len(data.labels)} rows of the run's data, which has changed since "
            "training (evaluate on it with data overrides instead)"
        )
    return split


def load_target(trained, ref: str, overrides: list[str], split: str, device: torch.device) -> Target:
    """The images and labels to evaluate: the run's ``split`` without overrides, all rows with them."""
    from omegaconf import OmegaConf

    from sketchsweep.config import DataConfig
    from sketchsweep.train import load_data

    if overrides:
        data_cfg = compose_data(trained.config, overrides)
    elif trained.config.get("data"):
        data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), trained.config["data"])
    else:
        raise EvalError(f"{ref}: no data config is known for this model; give data overrides (data.root=PATH ...)")
    if overrides and data_cfg.source.value == "folder" and data_cfg.root:
        # Check class names before reading every file: an unknown class fails in a second.
        from sketchsweep.data.folder import select_files

        map_classes(list(select_files(data_cfg.root, list(data_cfg.classes or []) or None)), trained.class_names)
    data = load_data(data_cfg, device)
    to_model = map_classes(data.class_names, trained.class_names)
    if overrides:
        label = _data_label(data_cfg)
        return Target(Rows(data.images), to_model[data.labels], label, f"all {len(data.labels):,} images of {label}")
    if data.class_names != trained.class_names:
        raise EvalError(
            f"the run's data now has classes {data.class_names}, the model {trained.class_names}: its split no "
            "longer applies (evaluate on the data with overrides, e.g. data.classes=[...])"
        )
    if split == "all":
        return Target(Rows(data.images), data.labels, "all", f"all {len(data.labels):,} images of the run's data")
    idx = _split_indices(_run_folder(ref), trained.run_id, data, data_cfg)[split]
    if len(idx) == 0:
        raise EvalError(f"{ref}: the run has no {split} split (data.test_fraction was 0)")
    name = {"val": "validation", "test": "test", "train": "training"}[split]
    return Target(
        Rows(data.images, idx), data.labels[idx], "" if split == "val" else split, f"the {name} split ({len(idx):,})"
    )


def log_to_mlflow(trained, ref: str, out: Path, metrics: dict[str, float], name: str) -> str:
    """Log the files (under ``name``) and the metrics to the model's MLflow run; returns the store URI."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from sketchsweep.tracking import tracking_uri

    if trained.run_id is None:
        raise EvalError(f"{ref}: no MLflow run is known for this model (no checkpoint with a run id); drop --log")
    # runs:/ refs were found in the default store; a run folder's config says where it logged.
    configured = None if ref.startswith("runs:/") else (trained.config.get("mlflow") or {}).get("tracking_uri")
    uri = tracking_uri(configured)
    client = MlflowClient(uri)
    client.log_artifacts(trained.run_id, str(out), artifact_path=name)
    import time

    now = int(time.time() * 1000)
    client.log_batch(trained.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    return uri


def main(argv: list[str] | None = None) -> int:
    prog = "python -m sketchsweep.evaluate"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a trained model: top-1/3/5 and per-class accuracy, confusions, plots.",
        epilog="Examples:  %(prog)s outputs/2026-11-24/10-00-00   |   %(prog)s runs:/<run_id> --log   |   "
        "%(prog)s RUN data=quickdraw data.root=PATH 'data.classes=[cat,dog]'",
    )
    parser.add_argument("model", help="a run folder, a checkpoint.pt / *.pth in one, or runs:/<run_id>")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra data overrides (data=quickdraw data.root=PATH data.classes=[...]): evaluate on all rows of "
        "that data instead of the run's split; classes are matched by name to the model's",
    )
    parser.add_argument("--split", choices=("val", "test", "train", "all"), default="val", help="without overrides")
    parser.add_argument("--out", type=Path, help="output folder (default: <run folder>/evaluation[-<data>])")
    parser.add_argument("--log", action="store_true", help="also log the files and metrics to the model's MLflow run")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_intermixed_args(argv)

    from hydra.errors import HydraException
    from mlflow.exceptions import MlflowException
    from omegaconf.errors import OmegaConfBaseException

    from sketchsweep.checkpoint import ModelRefError, load_trained
    from sketchsweep.data import DataError
    from sketchsweep.train import ConfigError, pick_device

    try:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size: expected a positive integer, got {args.batch_size}")
        if args.overrides and args.split != "val":
            raise EvalError("--split applies to the run's own data; with data overrides every row is evaluated")
        trained = load_trained(args.model)
        if args.log and trained.run_id is None:
            raise EvalError(
                f"{args.model}: no MLflow run is known for this model (no checkpoint with a run id); drop --log"
            )
        device = pick_device(args.device)
        target = load_target(trained, args.model, args.overrides, args.split, device)
        name = "evaluation" + (f"-{target.label}" if target.label else "")
        folder = _run_folder(args.model)
        out = args.out or (folder / name if folder is not None else Path(f"{name}-{trained.run_id}"))
        precision = str((trained.config.get("trainer") or {}).get("precision") or "auto")
        metrics = evaluation_artifacts(
            trained.model.to(device),
            target.images,
            target.labels,
            trained.class_names,
            out,
            args.batch_size,
            device,
            precision,
        )
        print(
            f"{target.description}: top-1 {metrics['eval_top1']:.4f}  top-3 {metrics['eval_top3']:.4f}  "
            f"top-5 {metrics['eval_top5']:.4f}  ({len(trained.class_names)} classes, model {trained.source})"
        )
        print(f"files: {out}")
        if args.log:
            prefix = f"eval_{target.label.replace('-', '_')}_" if target.label else "eval_"
            logged = {prefix + k[len("eval_") :]: v for k, v in metrics.items()}
            uri = log_to_mlflow(trained, args.model, out, logged, name)
            print(f"logged to MLflow run {trained.run_id} at {uri}: {', '.join(logged)} and artifacts {name}/")
    except (
        EvalError,
        ModelRefError,
        DataError,
        ConfigError,
        HydraException,
        OmegaConfBaseException,
        MlflowException,
        OSError,
    ) as e:
        cause = f": {e.__cause__}" if e.__cause__ is not None and str(e.__cause__) not in str(e) else ""
        message = " ".join(f"{e}{cause}".split())  # one line, whatever the exception's formatting
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import os

    # runs:/ references download a few small files: MLflow's progress bars would bury the result.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.exit(main())
