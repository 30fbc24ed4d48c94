"""Classify drawings with a trained model: an exported ``.onnx`` file, a run folder, a checkpoint,
a run or a Model Registry version.

    python -m sketchsweep.predict model.onnx cat.png drawings/ batch.npy --top-k 3
    python -m sketchsweep.predict outputs/2026-11-24/10-00-00 cat.png --json

Images (PNG, JPEG, ... up to PIL's 89M-pixel limit, dark-on-light or light-on-dark, transparency composited) are
framed the way Quick, Draw!'s bitmaps are (``load_image``); ``.npy`` files hold ready 28x28 rows.
An ``.onnx`` model runs on ONNX Runtime and this module then never imports torch; the other
references load the PyTorch model (``sketchsweep.checkpoint.load_trained``), importing torch then.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from sketchsweep import cli
from sketchsweep.data import DataError
from sketchsweep.data.folder import as_uint8
from sketchsweep.modelref import FORMS
from sketchsweep.predictor import InputError, Predictor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SIDE = 28
# Quick, Draw!'s framing (sketchsweep.data.raster): centre lines in a 256 box, a 16-unit stroke and
# 16 units of padding, so the ink's bounding box fills 271/304 of the image (a ~1.5 px margin)
# and a stroke is 16/304 of the image wide (~1.5 px at 28x28).
INK_FRACTION = 271.0 / 304.0
STROKE_FRACTION = 16.0 / 304.0
WORK_SIDE = 400  # images are max-pooled to at most about this size before thickening strokes
MIN_WORK_SIDE = 224  # and smaller ones enlarged to at least this
LOAD_SIDE = 2048  # bigger images are reduced to about this as they are read (12000 px took 3.6 GB as floats)
STRIP_PIXELS = 1 << 20  # and converted this many pixels at a time on the way
# EXIF orientation 2-8 -> the turn that shows the image upright (as ImageOps.exif_transpose does it).
_TURN_NAMES = "FLIP_LEFT_RIGHT ROTATE_180 FLIP_TOP_BOTTOM TRANSPOSE ROTATE_270 TRANSVERSE ROTATE_90"
TURNS = {o: Image.Transpose[t] for o, t in enumerate(_TURN_NAMES.split(), start=2)}


# ---------------------------------------------------------------- images -> uint8 (28, 28)


def load_image(path: str | Path) -> np.ndarray:
    """Read a drawing and frame it like Quick, Draw!: uint8 ``(28, 28)``, strokes 255 on 0.

    Images over PIL's ``Image.MAX_IMAGE_PIXELS`` (89M pixels: 12000 x 12000 px of white is a
    148 kB PNG) are refused. Bigger ones than ``LOAD_SIDE`` px are reduced to about that: JPEGs as
    they are decoded; other formats are decoded whole (so that limit is what bounds the memory
    used), then converted and reduced a strip at a time."""
    try:
        with warnings.catch_warnings():
            # PIL only warns over the limit (and raises at twice it): refuse, as any unreadable image.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.seek(0)  # the first frame of an animation
                f = _reduction(im.size)
                if f > 1:
                    im.draft(None, (im.width // f, im.height // f))  # JPEG: decoded at 1/2 to 1/8 scale
                # Photos taken sideways are turned upright once reduced (turning costs a full-size copy).
                gray, alpha = _gray_alpha(im, TURNS.get(im.getexif().get(ExifTags.Base.Orientation)))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: too large to read as a drawing ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for what is not an image, OSError for a
        # truncated one, and occasionally ValueError/SyntaxError from a broken header.
        raise InputError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None
    try:
        return frame_drawing(gray, alpha)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def _reduction(size: tuple[int, int]) -> int:
    """The factor that brings an image's longer side to at most ``LOAD_SIDE``."""
    return max(1, math.ceil(max(size) / LOAD_SIDE))


def _reduced(im, mode: str, turn) -> Image.Image:
    """``im`` in ``mode`` (``L``, ``LA`` or ``F``), box-averaged down to about ``LOAD_SIDE`` px and
    turned upright (``turn``), in PIL, before it becomes float arrays (8 bytes a pixel, and several
    of them). A big image is converted and reduced a strip of rows at a time, so no full-size
    converted copy is made (4 bytes a pixel for ``F``, and more on the way to ``LA``): the decoded
    image is the only full-size one. Strokes that thin out are stretched back by ``frame_drawing``."""
    f = _reduction(im.size)
    if f == 1:
        out = _converted(im, mode)
    else:
        out = Image.new(mode, (-(-im.width // f), -(-im.height // f)))
        step = f * max(1, STRIP_PIXELS // (im.width * f))  # whole boxes of f x f pixels per strip
        for top in range(0, im.height, step):
            strip = im.crop((0, top, im.width, min(top + step, im.height)))
            out.paste(_converted(strip, mode).reduce(f), (0, top // f))
    return out.transpose(turn) if turn is not None else out


def _converted(im, mode: str) -> Image.Image:
    return im.convert("RGBA").convert("LA") if mode == "LA" else im.convert(mode)


def _gray_alpha(im, turn=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Luminance in [0, 255] and, for images with transparency, alpha in [0, 1]."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float greyscale
        top = 65535.0 if im.getextrema()[1] > 255 else 255.0
        return np.asarray(_reduced(im, "F", turn), dtype=np.float64) * (255.0 / top), None
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        la = np.asarray(_reduced(im, "LA", turn), dtype=np.float64)
        return la[..., 0], la[..., 1] / 255.0
    return np.asarray(_reduced(im, "L", turn), dtype=np.float64), None


def frame_drawing(gray: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """A greyscale drawing (any size, values 0-255, either polarity) as uint8 ``(28, 28)``:
    ink 255 on background 0, cropped to the ink, centred with Quick, Draw!'s margin, strokes
    thickened to Quick, Draw!'s relative width when thinner, and area-averaged down to 28x28."""
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise InputError(f"expected a 2-D image, got shape {gray.shape}")
    if alpha is not None and (alpha < 0.999).any():
        if alpha.sum() < 1.0:
            raise InputError("no drawing found (the image is fully transparent)")
        # Transparent pixels are background. Put them on the colour opposite to the visible
        # pixels (black strokes on transparency -> on white), so the ink stays visible.
        visible = float((gray * alpha).sum() / alpha.sum())
        gray = gray * alpha + (255.0 if visible < 128 else 0.0) * (1.0 - alpha)
    # Polarity: the border is background in a drawing (its median ignores the few strokes that
    # touch it). A light border means dark ink on light paper: invert.
    b = max(1, round(0.02 * min(gray.shape)))
    border = np.concatenate([gray[:b].ravel(), gray[-b:].ravel(), gray[:, :b].ravel(), gray[:, -b:].ravel()])
    background = float(np.median(border))
    ink = 255.0 - gray if background > 127.5 else gray
    background = min(background, 255.0 - background)
    peak = float(ink.max())
    if peak - background < 32:
        raise InputError("no drawing found (the image has no contrast)")
    # Stretch so paper is 0 and the darkest stroke 1. The ink's bounding box is where it reaches half
    # strength: the stroke's geometric edge, as in Quick, Draw!'s framing (sketchsweep.data.raster).
    ink = np.clip((ink - background) / (peak - background), 0.0, 1.0)
    ink = _crop(ink, margin=1)
    if max(ink.shape) < MIN_WORK_SIDE:
        # Small images: find the edges on a smooth enlargement, or the box is off by up to a
        # pixel per side, which at 28x28 is most of a stroke.
        ink = _resize_float(ink, math.ceil(MIN_WORK_SIDE / max(ink.shape)), Image.Resampling.BILINEAR)
    ink = _crop(ink, margin=0)
    # Drop the bottom 10 % (paper texture, JPEG ringing), which would grey the background.
    ink = np.clip((ink - 0.1) / 0.9, 0.0, 1.0)
    # Max-pool big drawings to <= ~WORK_SIDE px first: thin strokes keep full strength (an area
    # average would fade them) and the thickening below stays cheap.
    f = max(1, math.ceil(max(ink.shape) / INK_FRACTION / WORK_SIDE))
    if f > 1:
        h, w = -(-ink.shape[0] // f) * f, -(-ink.shape[1] // f) * f
        ink = np.pad(ink, ((0, h - ink.shape[0]), (0, w - ink.shape[1]))).reshape(h // f, f, w // f, f).max(axis=(1, 3))
    side = math.ceil(max(ink.shape) / INK_FRACTION)
    canvas = np.zeros((side, side))
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    canvas = _thicken(canvas, STROKE_FRACTION * side)
    return _resize(canvas, SIDE)


def _crop(ink: np.ndarray, margin: int) -> np.ndarray:
    rows, cols = np.nonzero(ink >= 0.5)
    if len(rows) == 0:
        raise InputError("no drawing found")
    top, left = max(rows.min() - margin, 0), max(cols.min() - margin, 0)
    return ink[top : rows.max() + 1 + margin, left : cols.max() + 1 + margin]


def _resize_float(ink: np.ndarray, factor: int, method) -> np.ndarray:
    h, w = ink.shape
    return np.asarray(Image.fromarray(ink.astype(np.float32)).resize((w * factor, h * factor), method))


def _thicken(ink: np.ndarray, target: float) -> np.ndarray:
    """Dilate strokes narrower than ``target`` px (a fine pen on a big canvas would otherwise all
    but vanish at 28x28). Stroke width ~ 2 * area / boundary length, from the binarized ink."""
    solid = ink > 0.5
    area = int(solid.sum())
    inner = solid.copy()
    inner[1:] &= solid[:-1]
    inner[:-1] &= solid[1:]
    inner[:, 1:] &= solid[:, :-1]
    inner[:, :-1] &= solid[:, 1:]
    boundary = area - int(inner.sum())
    if boundary == 0:
        return ink
    width = 2.0 * area / boundary
    radius = round((target - width) / 2.0)
    if width >= 0.8 * target or radius < 1:
        return ink
    padded = np.pad(ink, radius)
    out = ink.copy()
    h, w = ink.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:  # a round pen
                np.maximum(out, padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w], out=out)
    return out


def _resize(ink: np.ndarray, side: int) -> np.ndarray:
    # BOX: an exact area average when shrinking (anti-aliased, no ringing); bilinear when growing.
    method = Image.Resampling.BOX if ink.shape[0] >= side else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(ink.astype(np.float32)).resize((side, side), method))
    return np.rint(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_npy(path: str | Path) -> np.ndarray:
    """A ``.npy`` of uint8 ``(N, 784)``/``(N, 28, 28)`` (or one ``(784,)``/``(28, 28)``), or floats
    in [0, 1], as uint8 ``(N, 28, 28)``."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: cannot be read as a .npy array ({type(e).__name__}: {e})") from None
    if a.shape in ((784,), (28, 28)):
        a = a.reshape(1, 28, 28)
    if a.ndim not in (2, 3) or a.shape[1:] not in ((784,), (28, 28)):
        raise InputError(f"{path}: expected drawings (N, 784) or (N, 28, 28), got shape {a.shape}")
    try:
        return as_uint8(np.asarray(a).reshape(-1, 28, 28), str(path))
    except DataError as e:
        raise InputError(str(e)) from None


# ---------------------------------------------------------------- command line


@dataclass
class Item:
    """One drawing to classify, or one input that failed (``error`` set)."""

    input: str
    index: int | None = None  # row of a .npy batch
    image: np.ndarray | None = None
    error: str | None = None


def iter_inputs(paths: Sequence[str | Path]) -> Iterator[Item]:
    """Drawings from image files, ``.npy`` batches and folders of them (one level of subfolders, sorted)."""
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(
                f
                for f in [*p.iterdir(), *(g for d in p.iterdir() if d.is_dir() for g in d.iterdir())]
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES | {".npy"}
            )
            if not files:
                yield Item(str(p), error=f"{p}: no images or .npy files in this folder")
            for f in files:
                yield from _read(f)
        else:
            yield from _read(p)


def _read(path: Path) -> Iterator[Item]:
    try:
        if path.suffix.lower() == ".npy":
            batch = load_npy(path)
            for i in range(len(batch)):
                yield Item(str(path), i, batch[i])
        else:
            yield Item(str(path), None, load_image(path))
    except InputError as e:
        yield Item(str(path), error=str(e))


def _table(rows: list[tuple[Item, list[tuple[str, float]]]], k: int) -> str:
    header = ["input"] + [f"#{i + 1}" for i in range(k)]
    lines = [
        [it.input if it.index is None else f"{it.input}[{it.index}]"] + [f"{label} {p:.3f}" for label, p in top]
        for it, top in rows
    ]
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(wd) for v, wd in zip(r, widths, strict=False)).rstrip() for r in [header, *lines]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sketchsweep.predict",
        description="Classify drawings (images, .npy batches, folders of them) with a trained sketchsweep model.",
    )
    parser.add_argument("model", help=FORMS)
    big = f"images over {LOAD_SIDE} px are reduced (JPEGs as decoded, others once decoded whole), over 89M px refused"
    parser.add_argument("inputs", nargs="+", help=f"PNG/JPEG/... drawings, .npy files of 28x28 rows, or folders; {big}")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per drawing (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per drawing instead of a table")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    try:
        predictor = Predictor(args.model)
    except cli.UserError as e:  # ModelFileError, ModelRefError
        return cli.fail(e)
    k = min(args.top_k, len(predictor.class_names))
    failed = 0
    items: list[Item] = []
    for item in iter_inputs(args.inputs):
        if item.error:
            failed += 1
            cli.fail(f"{item.error} (skipped)", cli.FAILURE)
        else:
            items.append(item)
    tops = predictor.predict(np.stack([it.image for it in items]), k) if items else []
    if args.json:
        for it, top in zip(items, tops, strict=True):
            record = {"input": it.input, "index": it.index, "top_k": [{"label": lb, "probability": p} for lb, p in top]}
            print(json.dumps(record))
    elif items:
        print(_table(list(zip(items, tops, strict=True)), k))
    if failed:
        print(f"{failed} input(s) could not be read; {len(items)} drawing(s) classified", file=sys.stderr)
    return cli.FAILURE if failed else 0


if __name__ == "__main__":
    sys.exit(main())
