"""Prediction on real image files and .npy batches, with the exported .onnx (ONNX Runtime) and the run folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sketchsweep.data.raster import rasterize, simplify_box
from sketchsweep.data.synthetic import SHAPES, jitter
from sketchsweep.predict import Predictor, load_image, main
from tests.conftest import cli_env
from tests.test_export import TinyRun, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> TinyRun:
    return tiny_run(tmp_path_factory)


def strokes(name: str, i: int):
    """A drawing of class ``name`` as strokes in the 0-255 box (as the synthetic data draws them)."""
    rng = np.random.default_rng([100 + i, *name.encode()])
    return simplify_box(jitter(SHAPES[name](rng), rng))


def render(drawing, side: int) -> np.ndarray:
    """The drawing framed Quick, Draw!-style at ``side`` x ``side`` (strokes scale with the side)."""
    return rasterize([drawing], side=side, chunk=1)[0].reshape(side, side)


def place(ink: np.ndarray, height: int, width: int, top: int, left: int) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return canvas


def save_variants(drawing, folder, stem: str) -> list:
    """The same drawing as files a user might have: big white-on-black, small off-centre black-on-white,
    dark strokes on transparency, and a JPEG."""
    big = render(drawing, 300)
    small = place(render(drawing, 48), 53, 97, 3, 10)
    paths = [folder / f"{stem}-300-wob.png", folder / f"{stem}-97x53-bow.png", folder / f"{stem}-rgba.png"]
    Image.fromarray(big).save(paths[0])
    Image.fromarray(255 - small).save(paths[1])
    rgba = np.zeros((160, 120, 4), np.uint8)
    rgba[..., 3] = place(render(drawing, 100), 160, 120, 40, 12)  # black strokes, alpha = ink
    Image.fromarray(rgba, "RGBA").save(paths[2])
    paths.append(folder / f"{stem}-bow.jpg")
    Image.fromarray(255 - big).convert("RGB").save(paths[3], quality=80)
    return paths


@pytest.fixture(scope="module")
def drawings(run, tmp_path_factory):
    """Image files of drawings the model gets right as 28x28 bitmaps, with their class."""
    folder = tmp_path_factory.mktemp("drawings")
    onnx = Predictor(run.onnx_path)
    files, labels = [], []
    for name in run.class_names:
        candidates = [strokes(name, i) for i in range(4)]
        bitmaps = rasterize(candidates)
        right = [d for d, top in zip(candidates, onnx.predict(bitmaps, 1), strict=True) if top[0][0] == name]
        for i, d in enumerate(right[:2]):
            paths = save_variants(d, folder, f"{name}{i}")
            files += paths
            labels += [name] * len(paths)
    assert len(files) >= 4 * len(run.class_names)
    return folder, files, labels


def test_load_image_frames_like_quickdraw(run, tmp_path):
    d = strokes("star", 0)
    bitmap = render(d, 28)
    Image.fromarray(render(d, 300)).save(tmp_path / "wob.png")
    Image.fromarray(255 - place(render(d, 48), 53, 97, 3, 10)).save(tmp_path / "bow.png")
    for f in ("wob.png", "bow.png"):
        img = load_image(tmp_path / f)
        assert img.shape == (28, 28) and img.dtype == np.uint8 and img.max() >= 240
        assert np.abs(img.astype(int) - bitmap).mean() < 8, f  # same framing and stroke width
    # A fine 3 px pen on a 900x600 canvas: strokes are thickened to Quick, Draw!'s relative width.
    im = Image.new("L", (900, 600), 255)
    for s in d:
        ImageDraw.Draw(im).line([(float(x) * 2 + 100, float(y) * 2 + 60) for x, y in s], fill=0, width=3)
    im.save(tmp_path / "thin.png")
    assert 0.8 < load_image(tmp_path / "thin.png").sum() / bitmap.sum() < 1.25


def test_predict_images_gets_the_class_with_onnx_and_checkpoint_alike(run, drawings):
    _, files, labels = drawings
    images = np.stack([load_image(f) for f in files])
    onnx, torch_model = Predictor(run.onnx_path), Predictor(run.run_dir)
    assert (onnx.backend, torch_model.backend) == ("onnxruntime", "torch")
    top = [t[0][0] for t in onnx.predict(images)]
    accuracy = np.mean([t == label for t, label in zip(top, labels, strict=True)])
    assert accuracy >= 0.8, list(zip(files, top, strict=True))
    assert [t[0][0] for t in torch_model.predict(images)] == top
    assert np.abs(onnx.probabilities(images) - torch_model.probabilities(images)).max() < 1e-4


def test_cli_reports_and_skips_unreadable_inputs(run, drawings, tmp_path, capsys):
    folder, files, _ = drawings
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    batch = tmp_path / "batch.npy"
    np.save(batch, run.val_images[:3].reshape(3, 784))
    missing = tmp_path / "missing.png"
    argv = [str(run.onnx_path), str(files[0]), str(garbage), str(missing), str(batch), str(folder), "--json"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert f"{garbage}: cannot be read as an image" in err and f"{missing}: no such file" in err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 1 + 3 + len(files)
    assert [r["index"] for r in records[1:4]] == [0, 1, 2] and records[1]["input"] == str(batch)
    assert all(len(r["top_k"]) == 3 and r["top_k"][0]["label"] in run.class_names for r in records)

    # The table, from the run folder (PyTorch): every input readable, so exit code 0.
    assert main([str(run.run_dir), str(files[0]), "--top-k", "2"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["input", "#1", "#2"] and row.startswith(str(files[0]))


def test_cli_bad_model_is_exit_code_2(run, drawings, tmp_path, capsys):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a model")
    for model in (not_onnx, tmp_path / "missing-run"):
        assert main([str(model), str(drawings[1][0])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(model) in err and err.count("\n") == 1


def test_predict_with_onnx_never_imports_torch(run, drawings):
    _, files, _ = drawings
    code = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        f"sys.argv = ['predict', {str(run.onnx_path)!r}, {str(files[0])!r}, '--json']\n"
        "runpy.run_module('sketchsweep.predict', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["input"] == str(files[0])
