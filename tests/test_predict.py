"""Prediction on real image files and .npy batches, with the exported .onnx (ONNX Runtime) and the run folder."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

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


def cross_png(path, side: int, rgba: bool = False) -> None:
    """A thick black cross on white, ``side`` x ``side``, as a 1-bit PNG written row by row: a huge
    canvas in a small file (12000 x 12000 px in about 50 kB), without holding its pixels in memory.
    ``rgba``: 8-bit RGBA instead, black on transparent (4 bytes a pixel once decoded)."""
    bar, margin = range(side * 2 // 5, side * 3 // 5), side // 10
    white, vertical = np.ones(side, bool), np.ones(side, bool)
    vertical[bar.start : bar.stop] = False

    def pixels(v: np.ndarray) -> bytes:
        if not rgba:
            return np.packbits(v).tobytes()
        px = np.zeros((side, 4), np.uint8)
        px[~v, 3] = 255
        return px.tobytes()

    packed = {k: b"\0" + pixels(v) for k, v in (("white", white), ("v", vertical), ("h", ~white))}

    def row(y: int) -> bytes:
        return packed["h" if y in bar else "v" if margin <= y < side - margin else "white"]

    z = zlib.compressobj(9)
    data = b"".join(z.compress(row(y)) for y in range(side)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    depth, color = (8, 6) if rgba else (1, 0)  # 8-bit RGBA, or 1-bit greyscale
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, color, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def peak_memory_loading(png: Path, npy: Path, setup: str = "") -> tuple[int, int]:
    """``load_image(png)`` saved to ``npy`` in a fresh process (after ``setup``): its peak memory in
    MB, and how much the peak grew while loading. VmHWM is this process's own: ru_maxrss would count
    what the test process held when it forked."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from sketchsweep import predict\n"
        f"{setup}\n"
        "def peak():\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        "before = peak()\n"
        "np.save(sys.argv[2], predict.load_image(sys.argv[1]))\n"
        "print(peak() // 1024, (peak() - before) // 1024)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(png), str(npy)], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    peak, growth = proc.stdout.split()
    return int(peak), int(growth)


def test_a_big_image_is_reduced_before_it_is_read(tmp_path):
    """6000 x 6000 px: framed like the same drawing at 600 px, in a bounded amount of memory (about 1.2 GB
    when the whole canvas went through the float pipeline; well under half that now)."""
    cross_png(tmp_path / "big.png", 6000)
    cross_png(tmp_path / "small.png", 600)
    peak, _ = peak_memory_loading(tmp_path / "big.png", tmp_path / "big.npy")
    assert peak < 700, f"peak memory {peak} MB"
    big, small = np.load(tmp_path / "big.npy"), load_image(tmp_path / "small.png")
    assert big.max() >= 240 and np.abs(big.astype(int) - small).mean() < 4


def test_a_big_image_is_reduced_without_full_size_converted_copies(tmp_path):
    """6000 x 6000 px RGBA, so 144 MB once decoded: PIL decodes a PNG whole, but it is then converted and
    reduced strip by strip, so little more memory than that is used (converting it whole to
    greyscale-and-alpha, then reducing, took two and a half times as much)."""
    cross_png(tmp_path / "big.png", 6000, rgba=True)
    cross_png(tmp_path / "small.png", 600, rgba=True)
    # LOAD_SIDE 256: what follows the reduction (floats, LOAD_SIDE px square) weighs little
    _, growth = peak_memory_loading(tmp_path / "big.png", tmp_path / "big.npy", "predict.LOAD_SIDE = 256")
    decoded = 6000 * 6000 * 4 // 2**20
    assert growth < decoded * 1.5, f"peak memory grew by {growth} MB reading {decoded} MB"
    big, small = np.load(tmp_path / "big.npy"), load_image(tmp_path / "small.png")
    assert big.max() >= 240 and np.abs(big.astype(int) - small).mean() < 4


def test_big_images_of_any_mode_and_orientation_read_alike(tmp_path):
    """One drawing over LOAD_SIDE px, saved in each image mode PIL reads differently (palette, 1-bit,
    16-bit, with alpha), and sideways with an EXIF orientation: each is the same 28 x 28 bitmap."""
    ink = np.asarray(Image.fromarray(render(strokes("star", 0), 700)).resize((2100, 2100)))  # reduced by 2 when read
    gray = Image.fromarray(255 - ink)
    variants = {
        "L": gray,
        "P": gray.convert("P"),
        "1": gray.point(lambda v: 255 if v > 127 else 0).convert("1"),
        "I;16": Image.fromarray((255 - ink).astype(np.uint16) * 257),
        "LA": Image.merge("LA", [Image.new("L", gray.size, 0), Image.fromarray(ink)]),
        "RGBA": Image.merge("RGBA", [Image.new("L", gray.size, 0)] * 3 + [Image.fromarray(ink)]),
    }
    want = load_image(save(variants.pop("L"), tmp_path / "L.png"))
    for mode, im in variants.items():
        got = load_image(save(im, tmp_path / f"{mode.replace(';', '')}.png"))
        assert np.abs(got.astype(int) - want).mean() < (6 if mode == "1" else 1), mode
    sideways = gray.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    sideways.save(tmp_path / "sideways.png", exif=exif)
    assert np.abs(load_image(tmp_path / "sideways.png").astype(int) - want).mean() < 1


def save(im, path):
    im.save(path)
    return path


def test_an_image_over_the_pixel_limit_is_refused_by_name(run, drawings, tmp_path):
    """12000 x 12000 px in a few kB (PIL's decompression-bomb limit is 89M px): one line naming the file,
    the other inputs still classified, exit code 1 as for any unreadable input."""
    big = tmp_path / "huge.png"
    cross_png(big, 12000)
    assert big.stat().st_size < 200_000
    _, files, _ = drawings
    proc = subprocess.run(
        [sys.executable, "-m", "sketchsweep.predict", str(run.onnx_path), str(big), str(files[0]), "--json"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    first, summary = proc.stderr.splitlines()
    assert first.startswith(f"error: {big}: ") and "pixels" in first and "Traceback" not in proc.stderr
    assert summary == "1 input(s) could not be read; 1 drawing(s) classified"
    assert json.loads(proc.stdout)["input"] == str(files[0])
