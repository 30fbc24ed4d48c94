"""An exponential moving average of a model's weights (``trainer.ema_decay``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A copy of ``model`` whose weights follow the trained ones: after every optimizer step
    ``ema = decay * ema + (1 - decay) * weights``; BatchNorm's running statistics are averaged the
    same way and its step counter copied. Early on the decay is ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so the average is not anchored to the random initial weights (the warm-up
    of TensorFlow's ExponentialMovingAverage).

    The copy is what the run evaluates and keeps (``ema.model``); training goes on with ``model``.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA: expected 0 < decay < 1, got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # state_dict tensors share storage with the parameters and buffers: read them once.
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))
        self._ema = [e for e, _ in pairs if e.is_floating_point()]
        self._trained = [m for e, m in pairs if e.is_floating_point()]
        self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]  # BatchNorm's step counters

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._ema, self._trained, 1.0 - decay)  # one fused update for every tensor
        for e, m in self._others:
            e.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return {"model": weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
