"""Learning-rate schedules torch does not ship in the form sketchsweep steps them (once per epoch)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """``scheduler=onecycle``: the one-cycle shape, per epoch. Epoch ``e`` (0-based) trains with

    - ``lr * (e + 1) / (warmup_epochs + 1)`` while ``e < warmup_epochs`` (a linear warm-up: large
      early steps on freshly initialised BatchNorm statistics are what warm-up avoids), then
    - a cosine from ``lr`` down to ``eta_min`` at the last epoch.

    With ``warmup_epochs=0`` it is ``CosineAnnealingLR(T_max=epochs)``. The lr is a closed form of
    the epoch, so a resumed run can rebuild it at any epoch (``sketchsweep.resume``).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 2, eta_min: float = 0.0, last_epoch=-1
    ) -> None:
        if epochs < 1 or not 0 <= warmup_epochs < epochs:
            raise ValueError(f"WarmupCosineLR: expected 0 <= warmup_epochs < epochs; got {warmup_epochs}, {epochs}")
        self.epochs, self.warmup_epochs, self.eta_min = epochs, warmup_epochs, eta_min
        super().__init__(optimizer, last_epoch)

    def _factor(self, epoch: int) -> float:
        """The share of ``lr`` (between eta_min and lr, after warm-up) at ``epoch``."""
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        progress = min(epoch - self.warmup_epochs, self.epochs - self.warmup_epochs) / (
            self.epochs - self.warmup_epochs
        )
        return (1 + math.cos(math.pi * progress)) / 2

    def _get_closed_form_lr(self) -> list[float]:
        f, e = self._factor(self.last_epoch), self.last_epoch
        if e < self.warmup_epochs:
            return [base * f for base in self.base_lrs]
        return [self.eta_min + (base - self.eta_min) * f for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self._get_closed_form_lr()
