"""Render stroke drawings to 28x28 bitmaps the way Google made Quick, Draw!'s numpy_bitmap files.

Google's recipe (documented in the quickdraw-dataset issues): the simplified drawing (coordinates
in a 0-255 box, aligned to 0) is centred on its bounding box inside a 256 box, stroked with a
16-unit round-capped line, padded by 16 units on each side, anti-aliased and scaled to 28x28.
That gives strokes about 1.5 px wide and a margin of about 2 px.

We draw directly at 28x28: each pixel's ink is its distance to the nearest segment turned into a
smooth (smoothstep) edge 1.2 px wide, which matches the stroke width and edge shading of real
numpy_bitmap rows (benchmarks/RASTER.md). Whole batches are rendered with NumPy, no per-pixel Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ORIGINAL_SIDE = 256.0

# A drawing is a list of strokes; a stroke is an (K, 2) array of (x, y) points, y pointing down.
Drawing = Sequence[np.ndarray]


def simplify_box(drawing: Drawing) -> list[np.ndarray]:
    """Align a drawing to 0 and scale it uniformly so its longer side spans 0..255,
    as Google's simplified format does."""
    pts = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in drawing])
    lo = pts.min(axis=0)
    extent = float((pts.max(axis=0) - lo).max())
    scale = 255.0 / extent if extent > 0 else 1.0
    return [(np.asarray(s, dtype=np.float64).reshape(-1, 2) - lo) * scale for s in drawing]


def _segments(drawing: Drawing, side: int, line_diameter: float, padding: float) -> np.ndarray:
    """(S, 4) segments in pixel coordinates for one drawing in the 0-255 box."""
    total_padding = 2.0 * padding + line_diameter
    scale = side / (ORIGINAL_SIDE + total_padding)
    strokes = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in drawing if len(s)]
    bbox_max = np.concatenate(strokes).max(axis=0)
    offset = (ORIGINAL_SIDE - bbox_max) / 2.0  # centre on the bounding box
    segs = []
    for s in strokes:
        p = (s + offset + total_padding / 2.0) * scale
        if len(p) == 1:  # a dot: a zero-length segment still gets a round cap
            p = np.repeat(p, 2, axis=0)
        segs.append(np.concatenate([p[:-1], p[1:]], axis=1))
    return np.concatenate(segs)


def rasterize(
    drawings: Sequence[Drawing],
    side: int = 28,
    line_diameter: float = 16.0,
    padding: float = 16.0,
    chunk: int = 128,
) -> np.ndarray:
    """Render drawings (coordinates in a 0-255 box) to ``uint8 (N, side*side)``, ink 255 on 0."""
    radius = line_diameter / 2.0 * side / (ORIGINAL_SIDE + 2.0 * padding + line_diameter)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5  # pixel centres
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1)  # (P, 2)
    out = np.empty((len(drawings), side * side), dtype=np.uint8)
    for start in range(0, len(drawings), chunk):
        batch = [_segments(d, side, line_diameter, padding) for d in drawings[start : start + chunk]]
        n_seg = max(len(s) for s in batch)
        # Pad with segments far outside the image so every drawing has the same count.
        segs = np.full((len(batch), n_seg, 4), 1e4, dtype=np.float32)
        for i, s in enumerate(batch):
            segs[i, : len(s)] = s
        # x and y apart, (B, P, S) each: reductions over a trailing axis of 2 cost numpy far more
        # than the arithmetic. Same float32 operations in the same order as (a, d) pairs would take.
        ax, ay, dx, dy = (segs[:, None, :, k] for k in range(4))  # (B, 1, S): start and direction
        dx, dy = dx - ax, dy - ay
        apx, apy = centres[None, :, None, 0] - ax, centres[None, :, None, 1] - ay  # (B, P, S)
        dd = dx * dx + dy * dy
        t = np.clip((apx * dx + apy * dy) / np.maximum(dd, 1e-12), 0.0, 1.0)
        ex, ey = apx - t * dx, apy - t * dy
        dist = np.sqrt((ex * ex + ey * ey).min(axis=2))  # (B, P)
        # Smoothstep ramp 1.2 px wide centred on the line's edge: it keeps the ink mass (stroke width) of
        # the old linear 1 px ramp but, like Google's bitmaps, has fewer exactly-255 pixels and more faint
        # ones (benchmarks/RASTER.md).
        u = np.clip((radius + 0.6 - dist) / 1.2, 0.0, 1.0)
        ink = u * u * (3.0 - 2.0 * u)
        out[start : start + len(batch)] = np.rint(ink * 255.0).astype(np.uint8)
    return out
