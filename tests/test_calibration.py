"""Calibration (ECE, reliability bins, temperature scaling) and test-time augmentation, on
hand-made arrays and a small real SketchCNN: core only (torch and numpy), no files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sketchsweep.calibration import expected_calibration_error, fit_temperature, reliability
from sketchsweep.data.views import Rows
from sketchsweep.engine import infer, to_input
from sketchsweep.model import SketchCNN
from sketchsweep.tta import SHIFTS, infer_tta, shift, views


def rows_of(top: float, n: int, right: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``n`` predictions of class 0 with probability ``top`` (the rest spread evenly), ``right`` of them correct."""
    p = np.full((n, classes), (1 - top) / (classes - 1))
    p[:, 0] = top
    labels = np.where(np.arange(n) < right, 0, 1)
    return p, labels


def test_ece_of_calibrated_bins_is_zero_and_of_confident_mistakes_is_their_confidence():
    # Two bins, each as accurate as it is confident.
    p1, y1 = rows_of(0.7, 10, 7)
    p2, y2 = rows_of(0.4, 5, 2)
    p, y = np.concatenate([p1, p2]), np.concatenate([y1, y2])
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    # Every prediction wrong at 99.9 %: the ECE is the confidence itself.
    wrong_p, wrong_y = rows_of(0.999, 20, 0)
    assert expected_calibration_error(wrong_p, wrong_y) == pytest.approx(0.999)


def test_ece_weighs_each_bins_gap_by_its_share():
    # 10 at 0.9 confidence, 6 right (gap 0.3); 20 at 0.55, 11 right (gap 0): ECE = 0.3 * 10 / 30.
    p1, y1 = rows_of(0.9, 10, 6)
    p2, y2 = rows_of(0.55, 20, 11)
    p, y = np.concatenate([p1, p2]), np.concatenate([y1, y2])
    assert expected_calibration_error(p, y) == pytest.approx(0.1)
    rel = reliability(p.max(1), p.argmax(1) == y)
    assert len(rel.count) == 15 and rel.count.sum() == 30
    assert rel.count[13] == 10 and rel.count[8] == 20  # 0.9 in (13/15, 14/15], 0.55 in (8/15, 9/15]
    assert rel.accuracy[13] == pytest.approx(0.6) and rel.confidence[13] == pytest.approx(0.9)
    assert np.isnan(rel.accuracy[0])  # empty bins have no accuracy
    # Fewer bins merge both groups into one: (0.6 * 10 + 0.55 * 20) / 30 accurate at the same mean confidence.
    assert expected_calibration_error(p, y, bins=1) == pytest.approx(abs(17 / 30 - (9 + 11) / 30))


def sampled(temperature: float, n: int = 20000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and labels drawn from ``softmax(logits / temperature)``: a model whose calibrating
    temperature is exactly ``temperature``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 4
    labels = torch.multinomial(torch.softmax(z / temperature, dim=1), 1, generator=g).squeeze(1)
    return z, labels


@pytest.mark.parametrize("true_t", [2.5, 1.0, 0.5])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at(true_t):
    z, y = sampled(true_t)
    t = fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.1)
    assert fit_temperature(z, y) == t  # deterministic
    before = expected_calibration_error(torch.softmax(z, 1).numpy(), y.numpy())
    after = expected_calibration_error(torch.softmax(z / t, 1).numpy(), y.numpy())
    assert after < 0.03 and (true_t == 1.0 or after < before)


def test_fit_temperature_stays_in_its_bounds_when_every_prediction_is_right():
    z = torch.eye(3).repeat(10, 1) * 5
    assert fit_temperature(z, z.argmax(1)) == pytest.approx(1e-2, rel=1e-3)
    with pytest.raises(ValueError, match="expected logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0))


# -- test-time augmentation ------------------------------------------------------------------


def drawings(n: int = 12, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 784): sparse strokes, ink touching every border (so shifts visibly drop some)."""
    g = torch.Generator().manual_seed(seed)
    ink = torch.rand(n, 784, generator=g) < 0.15
    return torch.where(ink, torch.randint(64, 256, (n, 784), generator=g), 0).to(torch.uint8)


def small_model(classes: int = 5) -> SketchCNN:
    torch.manual_seed(0)
    model = SketchCNN(classes, width=8, hidden=16)
    for m in model.modules():  # non-trivial statistics, so logits differ between views
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    return model.eval()


def test_shift_moves_the_drawing_and_brings_in_background():
    x = drawings()
    grid = x.view(-1, 28, 28)
    for dy, dx in [(0, 1), (0, -1), (1, 0), (-1, 0), (2, -3)]:
        moved = shift(x, dy, dx)
        assert moved.shape == x.shape and moved.dtype == torch.uint8
        m = moved.view(-1, 28, 28)
        src = grid[:, max(-dy, 0) : 28 - max(dy, 0), max(-dx, 0) : 28 - max(dx, 0)]
        assert torch.equal(m[:, max(dy, 0) : 28 - max(-dy, 0), max(dx, 0) : 28 - max(-dx, 0)], src)
        # What came in is background: 0, which training's normalization makes -1.
        came_in = torch.ones(28, 28, dtype=torch.bool)
        came_in[max(dy, 0) : 28 - max(-dy, 0), max(dx, 0) : 28 - max(-dx, 0)] = False
        assert (m[:, came_in] == 0).all()
        assert (to_input(moved).view(-1, 28, 28)[:, came_in] == -1).all()
    assert torch.equal(shift(x, 0, 0), x)
    v = views(x)
    assert v.shape == (len(SHIFTS) * len(x), 784) and torch.equal(v[: len(x)], x)  # identity first
    with pytest.raises(ValueError):
        shift(x, 28, 0)


def test_identity_tta_is_plain_inference_and_tta_averages_the_views():
    model, x = small_model(), drawings(20)
    rows = Rows(x, torch.arange(20) % 5)
    plain = torch.cat([logits for logits, _ in infer(model, rows.batches(8))])
    identity = torch.cat([logits for logits, _ in infer_tta(model, rows.batches(8), shifts=((0, 0),))])
    assert torch.equal(identity, plain)

    out = list(infer_tta(model, rows.batches(8)))
    tta = torch.cat([logits for logits, _ in out])
    assert torch.equal(torch.cat([y for _, y in out]), rows.labels)  # labels pass through, in order
    per_view = [torch.cat([lg for lg, _ in infer(model, [(shift(x, dy, dx), None)])]) for dy, dx in SHIFTS]
    torch.testing.assert_close(tta, torch.stack(per_view).mean(0), atol=1e-5, rtol=1e-5)
    assert (tta - plain).abs().max() > 1e-5  # the shifted views do change the logits
