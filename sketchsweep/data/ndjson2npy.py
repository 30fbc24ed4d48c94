"""Convert Quick, Draw!'s *simplified* ndjson to numpy_bitmap files.

``python -m sketchsweep.data.ndjson2npy SRC.ndjson DST_DIR [--recognized-only] [--append | --force]``
writes one ``DST_DIR/<word>.npy`` (``uint8 (N, 784)``) per ``word`` in the file, each drawing rendered
by :func:`sketchsweep.data.raster.rasterize`. A class file ``DST_DIR`` already has (any spelling of
the class) is refused unless ``--append`` (add the drawings to it) or ``--force`` (replace it).
All class files are written under temporary names, then renamed into place together: Ctrl-C,
``kill`` or a failure changes all of them or none, so running it again never appends twice.
Lines that are not valid drawings are skipped and counted by reason; the command fails (exit 2)
when nothing valid is left.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sketchsweep import cli
from sketchsweep.data.atomic import Staged, locked_folder, staged, stop_points
from sketchsweep.data.categories import class_key
from sketchsweep.data.errors import DataError
from sketchsweep.data.folder import EXPECTED, class_name, open_class_file
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


def is_number(v) -> bool:
    """A JSON value that is a finite number (coordinates here; pixels in ``serve``)."""
    # bool is an int subclass in Python; JSON true/false are not coordinates. NaN/Infinity parse too,
    # and an integer too big for a float (1 followed by 400 zeros) makes isfinite raise.
    try:
        return type(v) in (int, float) and math.isfinite(v)
    except OverflowError:
        return False


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
        if not all(is_number(v) for v in xs) or not all(is_number(v) for v in ys):
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


EXISTING = ("refuse", "append", "replace")  # what to do with a class file the folder already has


@dataclass
class Written:
    path: Path
    rows: int  # in the file now
    added: int  # drawings from this conversion


def class_files(dst: Path, words: list[str]) -> dict[str, Path]:
    """Each word's file: the folder's file of that class when it has one, under any spelling
    (``cat.npy``, ``full_numpy_bitmap_cat.npy``, ``traffic_light.npy`` for ``traffic light``), else
    ``dst/<word>.npy``. Two words or files of one class are a ``DataError`` naming both."""
    have: dict[str, Path] = {}
    for p in sorted(dst.glob("*.npy")):
        key = class_key(class_name(p))
        if key in have:
            raise DataError(f"{p}: class name {class_name(p)!r} is also given by {have[key]}; keep one file per class")
        have[key] = p
    out: dict[str, Path] = {}
    for word in words:
        same = [w for w in out if class_key(w) == class_key(word)]
        if same:
            raise DataError(f"words {same[0]!r} and {word!r} are the same class ('_' and space alike); expected one")
        out[word] = have.get(class_key(word), dst / f"{word}.npy")
    return out


def _check_existing(paths: list[Path], existing: str) -> None:
    """Refuse existing class files unless told to append or replace; check one before appending to it."""
    if paths and existing == "refuse":
        more = f" (and {', '.join(map(str, paths[1:]))})" if len(paths) > 1 else ""
        raise DataError(
            f"{paths[0]}: already exists{more}; pass --append to add the drawings to it or --force to replace it"
        )
    for p in paths if existing == "append" else []:
        arr = open_class_file(p)  # the header: (N, 784) or (N, 28, 28), rows, no pickles
        if arr.dtype != np.uint8:
            raise DataError(f"{p}: has dtype {arr.dtype}; --append adds to {EXPECTED}")


def _stage(drawings: list[list[np.ndarray]], path: Path, existing: str, files: Staged) -> Written:
    """Render ``drawings`` into a temporary file for ``path``: a new file, or the existing one
    replaced or appended to (keeping its permissions and its (N, 784) or (N, 28, 28) layout)."""
    images = rasterize(drawings)
    if not path.exists():
        files.save_npy(images, path)
        return Written(path, len(images), len(images))
    mode = path.stat().st_mode & 0o7777
    if existing == "append":
        old = open_class_file(path)
        images = np.concatenate([old, images.reshape(-1, *old.shape[1:])])
    files.save_npy(images, path, mode)
    return Written(path, len(images), len(drawings))


def convert(
    src: str | Path, dst: str | Path, recognized_only: bool = False, existing: str = "refuse"
) -> dict[str, Path]:
    """Render every valid drawing of ``src`` into ``dst/<word>.npy``; returns ``{word: path}``.
    A class file ``dst`` already has is refused, appended to or replaced (``existing``)."""
    written, _ = _convert(src, dst, recognized_only, existing)
    return {word: w.path for word, w in written.items()}


def _convert(src, dst, recognized_only, existing) -> tuple[dict[str, Written], Counter[str]]:
    if existing not in EXISTING:
        raise ValueError(f"existing={existing!r}: expected one of {EXISTING}")
    src, dst = Path(src), Path(dst)
    by_word, skipped = read_ndjson(src, recognized_only)
    if not by_word:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.most_common()) or "the file has no lines"
        raise DataError(f"{src}: no valid drawing to convert ({reasons}); expected simplified Quick, Draw! ndjson")
    dst.mkdir(parents=True, exist_ok=True)
    # One conversion at a time per folder: two appends to one file would each drop the other's drawings.
    # Every class file is written under a temporary name first, then all are renamed at once: an
    # interrupted or failed run changes none, so running it again never appends anything twice.
    with locked_folder(dst), stop_points() as check, staged() as files:
        paths = class_files(dst, sorted(by_word))
        _check_existing([p for p in paths.values() if p.exists()], existing)
        written = {}
        for word, path in paths.items():
            check()  # Ctrl-C or kill: stop here, removing the temporary files
            written[word] = _stage(by_word[word], path, existing, files)
        with check.finishing():
            files.replace_all()
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sketchsweep.data.ndjson2npy", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="simplified .ndjson file")
    parser.add_argument("dst", type=Path, help="folder to write <word>.npy files into")
    parser.add_argument("--recognized-only", action="store_true", help="keep only drawings with recognized=true")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--append", action="store_true", help="add the drawings to a class file DST already has")
    existing.add_argument("--force", action="store_true", help="replace a class file DST already has")
    args = parser.parse_args(argv)
    mode = "append" if args.append else "replace" if args.force else "refuse"
    try:
        written, skipped = _convert(args.src, args.dst, args.recognized_only, mode)
    except (DataError, OSError) as e:
        return cli.fail(e)
    except KeyboardInterrupt:
        return cli.fail(f"interrupted; no class file in {args.dst} was changed", cli.INTERRUPTED)
    for w in written.values():
        print(f"{w.path}: {w.rows} drawings" + (f" ({w.added} appended)" if w.rows != w.added else ""))
    print(f"written {sum(w.added for w in written.values())}, skipped {sum(skipped.values())}")
    for reason, n in skipped.most_common():
        print(f"  skipped {n}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
