"""Test-time augmentation: each drawing seen in a few shifted views, the model's logits averaged.

``SHIFTS`` are 5 views: the drawing as it is, and moved by one pixel right, left, down and up.
Shifts happen on the uint8 ``(B, 784)`` batch on its device (slicing, no per-image Python); the
pixels moved in are background 0, which training's Normalize(0.5, 0.5) makes -1 as everywhere
else. All views of a batch go through the model as one batch. Core: torch only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from sketchsweep.data.views import Batch
from sketchsweep.engine import MixedPrecision, infer

SIDE = 28
SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))  # (rows down, columns right)


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """uint8 drawings ``(B, 784)`` moved ``dy`` rows down and ``dx`` columns right (negative: up,
    left): what leaves the 28x28 frame is dropped, what comes in is background 0."""
    if abs(dy) >= SIDE or abs(dx) >= SIDE:
        raise ValueError(f"shift ({dy}, {dx}): expected less than {SIDE} pixels each way")
    x = images.reshape(-1, SIDE, SIDE)
    out = torch.zeros_like(x)
    h, w = SIDE - abs(dy), SIDE - abs(dx)
    top, left = max(dy, 0), max(dx, 0)
    src_top, src_left = max(-dy, 0), max(-dx, 0)
    out[:, top : top + h, left : left + w] = x[:, src_top : src_top + h, src_left : src_left + w]
    return out.reshape(-1, SIDE * SIDE)


def views(images: torch.Tensor, shifts: Sequence[tuple[int, int]] = SHIFTS) -> torch.Tensor:
    """The batch in every view of ``shifts``, view after view: uint8 ``(len(shifts) * B, 784)``."""
    if not shifts:
        raise ValueError("shifts: expected at least one view")
    flat = images.reshape(-1, SIDE * SIDE)
    return torch.cat([flat if (dy, dx) == (0, 0) else shift(flat, dy, dx) for dy, dx in shifts])


def infer_tta(
    model: nn.Module,
    batches: Iterable[Batch],
    precision: MixedPrecision | None = None,
    shifts: Sequence[tuple[int, int]] = SHIFTS,
) -> Iterator[Batch]:
    """``engine.infer`` with test-time augmentation: ``(float32 logits, labels)`` for each
    ``(uint8 images, labels)`` batch, the logits averaged over the ``shifts`` views. The model sees
    ``len(shifts)`` times the batch size at once: give batches that much smaller."""
    n = len(shifts)
    for logits, labels in infer(model, ((views(x, shifts), y) for x, y in batches), precision):
        yield logits.view(n, -1, logits.shape[1]).mean(dim=0), labels
