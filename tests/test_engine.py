import numpy as np
import torch

from sketchsweep.data import load_folder
from sketchsweep.engine import Split, evaluate, to_input, train_one_epoch
from sketchsweep.model import SketchCNN


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
