"""SketchCNN: the compact CNN sketchsweep trains on 28x28 sketches."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, negative_slope: float) -> nn.Sequential:
    """(Conv3x3 -> BatchNorm -> LeakyReLU) x 2. The conv has no bias: BatchNorm adds one."""
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers += [
            nn.Conv2d(c, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(negative_slope, inplace=True),
        ]
    return nn.Sequential(*layers)


class SketchCNN(nn.Module):
    """Three conv blocks with channels w, 2w, 4w; MaxPool after blocks 1 and 2 (28 -> 14 -> 7);
    average pool to 4x4; then Linear(4w*16 -> hidden) -> LeakyReLU -> Dropout -> Linear(-> classes).

    Input: float images ``(B, 1, 28, 28)``, already normalized to [-1, 1] (see ``sketchsweep.data``).
    Output: logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        width: int = 64,
        hidden: int = 256,
        dropout: float = 0.3,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 2 or width < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"SketchCNN: expected num_classes>=2, width>=1, hidden>=1, 0<=dropout<1; "
                f"got num_classes={num_classes}, width={width}, hidden={hidden}, dropout={dropout}"
            )
        w = width
        self.features = nn.Sequential(
            conv_block(1, w, negative_slope),
            nn.MaxPool2d(2),
            conv_block(w, 2 * w, negative_slope),
            nn.MaxPool2d(2),
            conv_block(2 * w, 4 * w, negative_slope),
            # 7x7 -> 4x4 with overlapping windows, so the head sees a fixed 4w*16 vector.
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * 16, hidden),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
