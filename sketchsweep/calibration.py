"""How far a classifier's probabilities can be trusted, and temperature scaling to fix them.

- ``expected_calibration_error``: the standard ECE (Guo et al., 2017): the top-1 confidences in
  equal-width bins over [0, 1], the sum over bins of |accuracy - mean confidence| x the bin's share.
- ``reliability``: the per-bin table behind the ECE and the reliability diagram.
- ``fit_temperature``: the T > 0 that minimizes the NLL of ``softmax(logits / T)``.

Core: torch and numpy only (no plots, no MLflow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15
T_BOUNDS = (1e-2, 1e2)  # the temperatures fit_temperature searches


@dataclass
class Reliability:
    """Top-1 confidence in ``len(count)`` equal-width bins: bin ``i`` holds (edges[i], edges[i+1]]
    (the first also 0). Accuracy and confidence are NaN in empty bins."""

    edges: np.ndarray  # float64 (bins + 1,), 0 to 1
    count: np.ndarray  # int64 (bins,): images per bin
    accuracy: np.ndarray  # float64 (bins,): share of them whose top-1 class is right
    confidence: np.ndarray  # float64 (bins,): their mean top-1 probability

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - confidence| x share of images."""
        filled = self.count > 0
        if not filled.any():
            return 0.0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((gaps * self.count[filled]).sum() / self.count.sum())


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin the top-1 ``confidence`` ``(N,)`` of each prediction and whether it was ``correct`` ``(N,)``."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=bool).ravel()
    if len(conf) != len(hit):
        raise ValueError(f"{len(conf)} confidences but {len(hit)} correct flags")
    if bins < 1:
        raise ValueError(f"bins: expected a positive integer, got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    # searchsorted against the edges themselves, so a value on an edge lands in the bin it closes.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: NaN
        accuracy = np.bincount(idx, weights=hit, minlength=bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
    return Reliability(edges, count, accuracy, mean_conf)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of ``probabilities`` ``(N, C)`` (rows summing to 1) against class indices ``labels`` ``(N,)``."""
    p = np.asarray(probabilities)
    if p.ndim != 2:
        raise ValueError(f"probabilities: expected (N, C), got shape {p.shape}")
    return reliability(p.max(axis=1), p.argmax(axis=1) == np.asarray(labels), bins).ece


def at_bound(temperature: float, bounds: tuple[float, float] = T_BOUNDS) -> bool:
    """Whether ``fit_temperature`` stopped at (within 1 % of) a bound of its search: the split then
    says nothing about the temperature (every drawing right by wide margins, or chance)."""
    return not bounds[0] * 1.01 < temperature < bounds[1] / 1.01


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = T_BOUNDS, tol: float = 1e-5
) -> float:
    """The temperature T in ``bounds`` minimizing the mean NLL of ``softmax(logits / T)`` against
    ``labels``: ~1 for a calibrated model, > 1 for an overconfident one.

    A golden-section search over log T, in float64 where the logits are: the NLL is convex in 1/T,
    so it has one minimum there (or at a bound, e.g. when every prediction is right), and the
    search is deterministic, with no learning rate or start to tune. ~35 passes over the logits."""
    z = torch.as_tensor(logits).detach().to(torch.float64)
    y = torch.as_tensor(labels).to(z.device, torch.int64)
    if z.ndim != 2 or len(z) != len(y) or len(z) == 0:
        raise ValueError(f"expected logits (N, C) and labels (N,), N > 0; got {tuple(z.shape)} and {tuple(y.shape)}")

    def nll(log_t: float) -> float:
        return F.cross_entropy(z / math.exp(log_t), y).item()

    a, b = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > tol:
        if fc <= fd:  # the minimum is in [a, d]
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2.0)
