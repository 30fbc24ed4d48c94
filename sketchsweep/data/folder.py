"""Load a numpy_bitmap folder: one ``<class>.npy`` of ``uint8 (N, 784)`` per class.

Every file is checked before anything is trained, and every problem is one ``DataError``
that names the file and says what was expected.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sketchsweep.data.categories import check_classes, class_key
from sketchsweep.data.errors import DataError

EXPECTED = "a numpy_bitmap .npy file: uint8 array of shape (N, 784), strokes 255 on background 0"
GOOGLE_PREFIX = "full_numpy_bitmap_"


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, 784)
    labels: np.ndarray  # int64 (N,), index into class_names
    class_names: list[str]
    files: list[Path] | None = None  # each class's file, in label order (what split.npz's record describes)


def class_name(path: Path) -> str:
    """``full_numpy_bitmap_traffic light.npy`` -> ``traffic light``; ``cat.npy`` -> ``cat``."""
    stem = path.stem
    return stem[len(GOOGLE_PREFIX) :] if stem.startswith(GOOGLE_PREFIX) else stem


def list_class_files(root: str | Path) -> dict[str, Path]:
    """Class name -> file, sorted by class name (labels are indices in this order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder; expected a folder of {EXPECTED}")
    files: dict[str, Path] = {}
    keys: dict[str, Path] = {}
    for p in sorted(root.glob("*.npy")):
        name = class_name(p)
        # cat.npy next to full_numpy_bitmap_cat.npy, or traffic_light.npy next to "traffic light.npy"
        # (names are matched with "_" and space alike): which one is the class?
        if class_key(name) in keys:
            other = keys[class_key(name)]
            raise DataError(
                f"{p}: class name {name!r} is also given by {other} (the same class: names match with '_' and "
                "space alike); keep one file per class"
            )
        files[name] = keys[class_key(name)] = p
    if not files:
        raise DataError(f"data.root: {root} has no .npy files; expected one per class, each {EXPECTED}")
    return dict(sorted(files.items()))


def open_class_file(path: Path) -> np.ndarray:
    """Memory-map one class file after checking its header: ``(N, 784)`` or ``(N, 28, 28)``,
    at least one row, not an object array. Nothing but the header is read."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            _, _, dtype = read_header(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as .npy (no valid NumPy header: {e}); expected {EXPECTED}") from None
    if dtype.hasobject:
        raise DataError(f"{path}: is a pickled object array (refused: loading it could run code); expected {EXPECTED}")
    try:
        # mmap: only the rows we keep are read; allow_pickle=False: a .npy must never run code.
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # truncated data, permissions...
        raise DataError(f"{path}: cannot be read as .npy ({type(e).__name__}: {e}); expected {EXPECTED}") from None
    shape = getattr(arr, "shape", None)
    flat = isinstance(arr, np.ndarray) and arr.ndim == 2 and shape[1] == 784
    square = isinstance(arr, np.ndarray) and arr.ndim == 3 and shape[1:] == (28, 28)
    if not (flat or square):
        raise DataError(f"{path}: has shape {shape}; expected {EXPECTED} (or (N, 28, 28))")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: has no rows; expected {EXPECTED}")
    return arr


def read_class_file(path: Path, max_rows: int | None = None) -> np.ndarray:
    """Read one class file as ``uint8 (N, 784)``, validating what is actually on disk."""
    arr = open_class_file(path)
    return np.ascontiguousarray(as_uint8(np.asarray(arr[:max_rows] if max_rows else arr), str(path)).reshape(-1, 784))


def as_uint8(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Drawings as uint8, strokes 255 on 0: uint8 as it is, floats in [0, 1] scaled to 0-255;
    anything else is a ``DataError`` naming ``what``."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind != "f":
        raise DataError(f"{what}: has dtype {a.dtype}; expected uint8 (0-255), or floats in [0, 1]")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1:
        raise DataError(f"{what}: {a.dtype} values span [{lo}, {hi}]; expected uint8, or floats in [0, 1]")
    return np.rint(a * 255.0).astype(np.uint8)


def select_files(
    root: str | Path, classes: list[str] | None = None, max_per_class: int | None = None
) -> dict[str, Path]:
    """The class files to use, sorted by class name (labels are indices in this order)."""
    files = list_class_files(root)
    if classes:
        files = {c: files[c] for c in sorted(check_classes(classes, available=files))}
    if len(files) < 2:
        raise DataError(f"data.root: {root} gives {len(files)} class(es); expected at least 2 .npy files")
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"data.max_per_class: expected a positive integer, got {max_per_class}")
    return files


def load_folder(root: str | Path, classes: list[str] | None = None, max_per_class: int | None = None) -> Dataset:
    """Load every (or the chosen) class of a numpy_bitmap folder into memory."""
    files = select_files(root, classes, max_per_class)
    arrays = [read_class_file(p, max_per_class) for p in files.values()]
    return Dataset(np.concatenate(arrays), class_labels([len(a) for a in arrays]), list(files), list(files.values()))


def class_labels(counts: list[int]) -> np.ndarray:
    """Labels for classes stored one after another: [0]*counts[0] + [1]*counts[1] + ..."""
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def stratified_split(
    labels: np.ndarray, class_names: list[str], val_fraction: float, seed: int, test_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-class split into (train, val, test) indices; test is empty unless asked for.

    Each class is shuffled by a generator seeded from ``seed`` (``data.split_seed``) and the
    class's name, so a class's split does not depend on the training seed, on which other
    classes were loaded, or on their order on disk: every run of a sweep is scored on the same
    validation images.
    """
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"data.val_fraction / data.test_fraction: expected 0 < val, 0 <= test, val + test < 1; "
            f"got {val_fraction} and {test_fraction}"
        )
    parts: tuple[list, list, list] = ([], [], [])
    # Loaders store classes as consecutive blocks: then each class is a range, found without
    # scanning all labels once per class (345 scans of 50M labels would take minutes).
    blocks = np.searchsorted(labels, np.arange(len(class_names) + 1)) if np.all(labels[1:] >= labels[:-1]) else None
    for c, name in enumerate(class_names):
        idx = np.arange(blocks[c], blocks[c + 1]) if blocks is not None else np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, round(val_fraction * len(idx)))
        n_test = max(1, round(test_fraction * len(idx))) if test_fraction > 0 else 0
        if n_val + n_test >= len(idx):
            raise DataError(f"class {name!r} has {len(idx)} image(s): too few to split into train/val/test")
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return train, val, test
