"""Convert Quick, Draw!'s *simplified* ndjson to numpy_bitmap files.

``python -m sketchsweep.data.ndjson2npy SRC.ndjson DST_DIR [--recognized-only]`` writes one
``DST_DIR/<word>.npy`` (``uint8 (N, 784)``) per ``word`` in the file, each drawing rendered by
:func:`sketchsweep.data.raster.rasterize`. Lines that are not valid drawings are skipped and
counted by reason; the command fails (exit 2) only when nothing valid is left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from sketchsweep import cli
from sketchsweep.data.errors import DataError
from sketchsweep.data.raster import rasterize

# Skip reasons, as counted and printed.
INVALID_JSON = "invalid JSON"
NOT_AN_OBJECT = "not a JSON object"
BAD_WORD = "missing or ill-typed word"
MISSING_DRAWING = "missing drawing"
BAD_DRAWING = "ill-typed drawing"
LENGTH_MISMATCH = "stroke xs/ys lengths differ"
NON_NUMERIC = "non-numeric coordinates"
OUT_OF_BOX = "coordinates outside 0-255"
EMPTY_DRAWING = "empty drawing"
NOT_RECOGNIZED = "not recognized (--recognized-only)"


def _is_number(v) -> bool:
    # bool is an int subclass in Python; JSON true/false are not coordinates. NaN/Infinity parse too.
    return type(v) in (int, float) and math.isfinite(v)


def parse_drawing(raw) -> tuple[list[np.ndarray] | None, str | None]:
    """``[[xs, ys], ...]`` -> (list of ``(K, 2)`` float arrays, None), or (None, skip reason)."""
    if not isinstance(raw, list):
        return None, BAD_DRAWING
    strokes = []
    for stroke in raw:
        # Simplified strokes are exactly [xs, ys]; raw-format [xs, ys, ts] is not in a 0-255 box.
        if not (isinstance(stroke, list) and len(stroke) == 2 and all(isinstance(c, list) for c in stroke)):
            return None, BAD_DRAWING
        xs, ys = stroke
        if not all(_is_number(v) for v in xs) or not all(_is_number(v) for v in ys):
            return None, NON_NUMERIC
        if len(xs) != len(ys):
            return None, LENGTH_MISMATCH
        if xs:
            strokes.append(np.column_stack([xs, ys]).astype(np.float64))
    if not strokes:
        return None, EMPTY_DRAWING
    pts = np.concatenate(strokes)
    if pts.min() < 0 or pts.max() > 255:
        return None, OUT_OF_BOX
    return strokes, None


def _valid_word(word) -> bool:
    # The word becomes a file name: refuse anything that could leave DST_DIR or hide the file.
    return isinstance(word, str) and word.strip() != "" and not word.startswith(".") and not set(word) & set("/\\\0")


def read_ndjson(
    path: str | Path, recognized_only: bool = False
) -> tuple[dict[str, list[list[np.ndarray]]], Counter[str]]:
    """Read a simplified ndjson file into ``{word: [drawing, ...]}`` and a Counter of skip reasons."""
    path = Path(path)
    by_word: dict[str, list[list[np.ndarray]]] = {}
    skipped: Counter[str] = Counter()
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():  # blank lines (a trailing newline) are not drawings
                    continue
                try:
                    record = json.loads(line)  # bytes: json detects the encoding; bad UTF-8 is a ValueError
                except ValueError:
                    skipped[INVALID_JSON] += 1
                    continue
                if not isinstance(record, dict):
                    skipped[NOT_AN_OBJECT] += 1
                    continue
                if "drawing" not in record:
                    skipped[MISSING_DRAWING] += 1
                    continue
                drawing, reason = parse_drawing(record["drawing"])
                if reason is None and not _valid_word(record.get("word")):
                    reason = BAD_WORD
                if reason is None and recognized_only and record.get("recognized") is not True:
                    reason = NOT_RECOGNIZED
                if reason is not None:
                    skipped[reason] += 1
                    continue
                by_word.setdefault(record["word"], []).append(drawing)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e}); expected a simplified Quick, Draw! .ndjson file") from None
    return by_word, skipped


def _save_atomic(arr: np.ndarray, dst: Path) -> None:
    """Write ``dst`` under a temporary name in the same folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(src: str | Path, dst: str | Path, recognized_only: bool = False) -> dict[str, Path]:
    """Render every valid drawing of ``src`` into ``dst/<word>.npy``; returns ``{word: path}``."""
    result, _ = _convert(src, dst, recognized_only)
    return result


def _convert(src, dst, recognized_only) -> tuple[dict[str, Path], tuple[dict[str, int], Counter[str]]]:
    src, dst = Path(src), Path(dst)
    by_word, skipped = read_ndjson(src, recognized_only)
    if not by_word:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.most_common()) or "the file has no lines"
        raise DataError(f"{src}: no valid drawing to convert ({reasons}); expected simplified Quick, Draw! ndjson")
    dst.mkdir(parents=True, exist_ok=True)
    written = {}
    for word, drawings in sorted(by_word.items()):
        written[word] = dst / f"{word}.npy"
        _save_atomic(rasterize(drawings), written[word])
    return written, ({w: len(d) for w, d in by_word.items()}, skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sketchsweep.data.ndjson2npy", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="simplified .ndjson file")
    parser.add_argument("dst", type=Path, help="folder to write <word>.npy files into")
    parser.add_argument("--recognized-only", action="store_true", help="keep only drawings with recognized=true")
    args = parser.parse_args(argv)
    try:
        written, (counts, skipped) = _convert(args.src, args.dst, args.recognized_only)
    except DataError as e:
        return cli.fail(e)
    for word, path in written.items():
        print(f"{path}: {counts[word]} drawings")
    print(f"written {sum(counts.values())}, skipped {sum(skipped.values())}")
    for reason, n in skipped.most_common():
        print(f"  skipped {n}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
