import pytest
import torch

from sketchsweep.model import SketchCNN, count_parameters


@pytest.mark.parametrize("width", [4, 16, 64, 128])
def test_output_shape_and_feature_map(width):
    model = SketchCNN(num_classes=24, width=width).eval()
    x = torch.randn(5, 1, 28, 28)
    assert model.features(x).shape == (5, 4 * width, 4, 4)
    assert model(x).shape == (5, 24)


def test_layout_matches_the_design():
    model = SketchCNN(num_classes=10, width=8, hidden=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 6
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 2
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32 * 16, 32), (32, 10)]


def test_width_scales_parameters():
    assert count_parameters(SketchCNN(10, width=32)) < count_parameters(SketchCNN(10, width=64))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        SketchCNN(num_classes=1)
    with pytest.raises(ValueError, match="dropout"):
        SketchCNN(num_classes=3, dropout=1.5)


def test_core_imports_without_hydra_or_mlflow():
    """Benchmarks run on machines with only torch and numpy: the core must not need more."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules.update(hydra=None, omegaconf=None, mlflow=None, tqdm=None)\n"
        "import sketchsweep.data, sketchsweep.data.load, sketchsweep.data.views\n"
        "import sketchsweep.model, sketchsweep.engine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
