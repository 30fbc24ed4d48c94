"""Procedural "synthetic sketches": a deterministic, download-free stand-in for Quick, Draw!.

Each class is a shape drawn as jittered strokes (random rotation, anisotropic scale, shear,
per-point noise, hand-drawn wobble), rendered by the same rasterizer as real strokes and
written in Google's numpy_bitmap format: one ``<class>.npy`` of ``uint8 (N, 784)`` per class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sketchsweep.data.atomic import stop_points, temp_folder
from sketchsweep.data.errors import DataError
from sketchsweep.data.raster import rasterize, simplify_box

Strokes = list[np.ndarray]


def _polyline(points, closed: bool = False) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    return np.vstack([p, p[:1]]) if closed else p


def _arc(rng, cx=0.0, cy=0.0, r=1.0, start=0.0, sweep=2 * np.pi, n=32) -> np.ndarray:
    a = start + np.linspace(0.0, sweep, n)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def circle(rng) -> Strokes:
    # Hand-drawn circles rarely close exactly: overshoot or leave a gap.
    return [_arc(rng, start=rng.uniform(0, 2 * np.pi), sweep=2 * np.pi + rng.uniform(-0.3, 0.4))]


def square(rng) -> Strokes:
    return [_polyline([(-1, -1), (1, -1), (1, 1), (-1, 1)], closed=True)]


def triangle(rng) -> Strokes:
    return [_polyline([(0, -1), (1, 0.8), (-1, 0.8)], closed=True)]


def star(rng) -> Strokes:
    # A pentagram drawn in one stroke: every second vertex of a pentagon.
    a = -np.pi / 2 + np.arange(6) * 4 * np.pi / 5
    return [np.stack([np.cos(a), np.sin(a)], axis=1)]


def zigzag(rng) -> Strokes:
    k = int(rng.integers(4, 8))
    x = np.linspace(-1, 1, k)
    y = np.where(np.arange(k) % 2 == 0, -0.5, 0.5)
    return [np.stack([x, y], axis=1)]


def spiral(rng) -> Strokes:
    turns = rng.uniform(2.0, 3.2)
    a = np.linspace(0.0, turns * 2 * np.pi, 80)
    r = 0.1 + 0.9 * a / a[-1]
    return [np.stack([r * np.cos(a), r * np.sin(a)], axis=1)]


def arrow(rng) -> Strokes:
    head = rng.uniform(0.3, 0.5)
    return [
        _polyline([(-1, 0), (1, 0)]),
        _polyline([(1 - head, -head), (1, 0), (1 - head, head)]),
    ]


def cross(rng) -> Strokes:
    return [_polyline([(0, -1), (0, 1)]), _polyline([(-1, 0), (1, 0)])]


def house(rng) -> Strokes:
    roof = rng.uniform(0.5, 0.9)
    return [
        _polyline([(-0.8, 0), (-0.8, 1), (0.8, 1), (0.8, 0)]),
        _polyline([(-1, 0.05), (0, -roof), (1, 0.05)]),
        _polyline([(-0.2, 1), (-0.2, 0.5), (0.2, 0.5), (0.2, 1)]),
    ]


def smiley(rng) -> Strokes:
    return [
        _arc(rng, start=rng.uniform(0, 2 * np.pi), sweep=2 * np.pi + 0.2),
        _polyline([(-0.35, -0.35), (-0.33, -0.3)]),
        _polyline([(0.35, -0.35), (0.33, -0.3)]),
        _arc(rng, r=0.55, start=0.2 * np.pi, sweep=0.6 * np.pi, n=12),
    ]


SHAPES: dict[str, Callable[[np.random.Generator], Strokes]] = {
    f.__name__: f for f in (circle, square, triangle, star, zigzag, spiral, arrow, cross, house, smiley)
}


def _resample(s: np.ndarray, spacing: float = 0.25) -> np.ndarray:
    """Points every ``spacing`` along the stroke, so the wobble bends straight lines instead of
    only moving their ends, and dense arcs do not cost more segments than they need."""
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(s, axis=0), axis=1))])
    t = np.linspace(0.0, arc[-1], max(2, int(np.ceil(arc[-1] / spacing)) + 1))
    return np.stack([np.interp(t, arc, s[:, i]) for i in (0, 1)], axis=1)


def jitter(strokes: Strokes, rng: np.random.Generator) -> Strokes:
    """Draw the shape the way a hurried hand would: a random affine transform, a low-frequency
    wobble and per-point noise; strokes cut short or left out; now and then a stray mark.
    The sloppiness keeps the task from being trivially separable, so hyperparameters matter."""
    theta = rng.uniform(-0.6, 0.6)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shear = np.array([[1.0, rng.uniform(-0.3, 0.3)], [0.0, 1.0]])
    scale = np.diag(rng.uniform(0.65, 1.35, size=2))
    m = rot @ shear @ scale
    phase, freq = rng.uniform(0, 2 * np.pi, size=2), rng.uniform(1.0, 3.0, size=2)
    if len(strokes) > 1 and rng.random() < 0.15:
        drop = rng.integers(len(strokes))
        strokes = [s for i, s in enumerate(strokes) if i != drop]
    if rng.random() < 0.2:
        a = rng.uniform(-1, 1, size=2)
        strokes = [*strokes, np.stack([a, a + rng.uniform(-0.5, 0.5, size=2)])]
    out = []
    for s in strokes:
        s = _resample(s)
        if len(s) > 4 and rng.random() < 0.3:  # the pen lifts early or starts late
            cut = int(rng.uniform(0.0, 0.25) * len(s))
            s = s[cut:] if rng.random() < 0.5 else s[: len(s) - cut]
        s = s @ m.T
        s = s + 0.07 * np.sin(freq * s[:, ::-1] * np.pi + phase)
        out.append(s + rng.normal(0.0, 0.025, size=s.shape))
    return out


def draw_class(name: str, n: int, seed: int, check: Callable[[], None] | None = None) -> np.ndarray:
    """``n`` drawings of one class as ``uint8 (n, 784)``; depends only on (name, seed, n).
    ``check`` is called now and then (``atomic.stop_points``: a signal stops generation there)."""
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic class {name!r}; expected one of {sorted(SHAPES)}")
    # Seed per class from its name, so a class's images do not depend on which others are made.
    rng = np.random.default_rng([seed, *name.encode()])
    shape = SHAPES[name]
    drawings = []
    for i in range(n):
        if check is not None and i % 256 == 0:
            check()
        drawings.append(simplify_box(jitter(shape(rng), rng)))
    return rasterize(drawings)


def cache_folder(root: str | Path, num_classes: int, per_class: int, seed: int) -> Path:
    """Where training caches a generated set under ``root`` (one folder per setting)."""
    return Path(root) / f"{num_classes}classes-{per_class}each-seed{seed}"


def write_synthetic(dst: str | Path, num_classes: int = 10, per_class: int = 1000, seed: int = 0) -> Path:
    """Write the first ``num_classes`` shapes as a numpy_bitmap folder at ``dst`` (if not there yet).

    The folder is built under a temporary name and renamed into place, so an interrupted
    generation never leaves a half-written dataset that later runs would trust; Ctrl-C or SIGTERM
    removes it. The folder gets the umask's permissions, so a shared cache is readable by others.
    """
    dst = Path(dst)
    if not 2 <= num_classes <= len(SHAPES) or per_class < 2:
        raise DataError(
            f"data.synthetic: expected 2 <= num_classes <= {len(SHAPES)} and per_class >= 2, "
            f"got num_classes={num_classes}, per_class={per_class}"
        )
    if (dst / "manifest.json").exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with stop_points() as check, temp_folder(dst.parent, f".{dst.name}-") as tmp:
        names = list(SHAPES)[:num_classes]
        for name in names:
            np.save(tmp / f"{name}.npy", draw_class(name, per_class, seed, check))
        manifest = {"generator": "sketchsweep.synthetic", "classes": names, "per_class": per_class, "seed": seed}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, dst)
        except OSError:  # another process finished first: keep theirs
            if not (dst / "manifest.json").exists():
                raise
    return dst
