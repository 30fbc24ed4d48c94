import sys
import warnings

import numpy as np
import pytest
import torch

from sketchsweep.data import load_folder
from sketchsweep.data.views import Split
from sketchsweep.engine import evaluate, random_affine, to_input, train_one_epoch
from sketchsweep.model import SketchCNN
from tests.conftest import PROJECT_ROOT


def test_to_input_is_totensor_then_normalize():
    x = torch.tensor([[0, 255, 51] + [0] * 781], dtype=torch.uint8)
    out = to_input(x)
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.float32
    expected = (torch.tensor([0.0, 1.0, 0.2]) - 0.5) / 0.5
    torch.testing.assert_close(out.flatten()[:3], expected)


def test_training_learns_and_evaluate_is_consistent(tiny_data):
    ds = load_folder(tiny_data)
    torch.manual_seed(0)
    split = Split(torch.from_numpy(ds.images), torch.from_numpy(ds.labels))
    model = SketchCNN(len(ds.class_names), width=8, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    before = evaluate(model, split)
    history = [train_one_epoch(model, split, opt, batch_size=32, generator=gen) for _ in range(4)]
    after = evaluate(model, split)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["val_loss"] < before["val_loss"]
    assert after["val_acc"] > 0.6  # 4 classes: chance is 0.25
    assert after["val_acc"] <= after["val_top3"] <= 1.0
    assert history[0]["train_images_per_sec"] > 0


def test_evaluate_counts_every_image_once():
    """A model that always predicts class 0 scores exactly the share of class 0."""
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 1])

    class Const(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 4)
            out[:, 0] = 1.0
            return out

    m = evaluate(Const(), Split(torch.zeros(7, 784, dtype=torch.uint8), labels), batch_size=3)
    assert np.isclose(m["val_acc"], 3 / 7)


def test_random_affine_identity_and_per_image_variation(tiny_data):
    ds = load_folder(tiny_data)
    x = to_input(torch.from_numpy(ds.images[:64]))
    same = random_affine(x, degrees=0.0, scale=(1.0, 1.0), translate=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    y = random_affine(x, degrees=15.0, scale=(0.8, 1.2), translate=0.1, hflip=True)
    assert y.shape == x.shape
    assert y.min() >= -1.0 - 1e-5 and y.max() <= 1.0 + 1e-5
    # Corners stay background: pixels pulled from outside the image are background, not grey.
    assert torch.allclose(y[:, :, 0, 0], torch.full_like(y[:, :, 0, 0], -1.0))
    changed = (y - x).abs().flatten(1).mean(1)
    assert (changed > 0.01).float().mean() > 0.9  # nearly every image moved, each differently
    assert len(set(changed.round(decimals=4).tolist())) > 50


def test_hflip_mirrors_the_image():
    x = -torch.ones(8, 1, 28, 28)
    x[:, :, 10:18, 2:6] = 1.0  # a bar near the left edge
    torch.manual_seed(1)
    y = random_affine(x, degrees=0.0, scale=(1.0, 1.0), translate=0.0, hflip=True)
    flipped = [bool(torch.allclose(y[i], x[i].flip(-1), atol=1e-5)) for i in range(8)]
    kept = [bool(torch.allclose(y[i], x[i], atol=1e-5)) for i in range(8)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_a_split_indexes_shared_images_without_copying_them():
    images = torch.arange(10, dtype=torch.uint8)[:, None].repeat(1, 784)
    labels = torch.arange(10) % 3
    split = Split(images, labels, torch.tensor([7, 2, 5, 9]))
    assert len(split) == 4
    in_order = torch.cat([x[:, 0] for x, _ in split.batches(3)]).tolist()
    assert in_order == [7, 2, 5, 9]
    batches = list(split.batches(3, torch.Generator().manual_seed(0)))
    rows = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert sorted(rows) == [2, 5, 7, 9] and torch.cat([y for _, y in batches]).tolist() == [r % 3 for r in rows]


def test_precision_auto_is_fp32_on_cpu_and_bf16_trains(tiny_data):
    from sketchsweep.engine import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None and resolve_precision("auto", cpu).channels_last
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    ds = load_folder(tiny_data)
    split = Split(torch.from_numpy(ds.images), torch.from_numpy(ds.labels))
    accs = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = SketchCNN(len(ds.class_names), width=8, hidden=32)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        precision = resolve_precision(name, cpu)
        for _ in range(4):
            train_one_epoch(model, split, opt, batch_size=32, generator=gen, precision=precision)
        accs[name] = evaluate(model, split, precision=precision)["val_acc"]
    assert accs["fp32"] > 0.6 and abs(accs["bf16"] - accs["fp32"]) < 0.1, accs


def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch):
    from sketchsweep.engine import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    for flag in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # a CPU without either
        monkeypatch.setattr(torch.cpu, flag, lambda: False)
    assert not native_bf16(cpu)
    with pytest.warns(UserWarning, match="trainer.precision=bf16: this CPU emulates bf16"):
        assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_bf16(cpu) and resolve_precision("bf16", cpu).dtype == torch.bfloat16
        assert resolve_precision("auto", cpu).dtype is None  # auto stays fp32 on a CPU


def test_engine_matches_the_seed_loop_accuracy(tiny_data):
    """The seed's per-sample Dataset + DataLoader loop and the engine reach the same accuracy."""
    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from bench_train import SeedDataset, seed_epoch

    ds = load_folder(tiny_data)
    split = Split(torch.from_numpy(ds.images), torch.from_numpy(ds.labels))
    accs = []
    for engine in (False, True):
        torch.manual_seed(0)
        model = SketchCNN(len(ds.class_names), width=8, hidden=32)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        loader = torch.utils.data.DataLoader(SeedDataset(ds.images, ds.labels), batch_size=32, shuffle=True)
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            if engine:
                train_one_epoch(model, split, opt, batch_size=32, generator=gen)
            else:
                seed_epoch(model, loader, opt, torch.device("cpu"))
        accs.append(evaluate(model, split)["val_acc"])
    assert accs[0] > 0.6 and abs(accs[0] - accs[1]) < 0.1, accs
