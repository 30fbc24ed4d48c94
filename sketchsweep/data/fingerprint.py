"""What a run's split indexes: each class file's rows, as a count and a content digest, saved in
``split.npz`` beside the indices, so that scoring the split later can tell that the files changed.

The digest is SHA-256 of the row count and of 16 blocks of 64 rows spread evenly over the rows
used (the first and last among them; every row of a class of up to 1,024), as uint8 pixels. So
it reads at most 800 kB per class whatever its size (16 short reads), and does not change when
a file is only rewritten in another layout ((N, 28, 28), Fortran order, another .npy version).
Appended, removed, replaced or reordered rows change the count or the digest; a few rows edited
in place between the blocks would not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sketchsweep.data.folder import Dataset, as_uint8, open_class_file

BLOCKS, BLOCK_ROWS = 16, 64
KEYS = ("classes", "class_files", "class_rows", "class_digest")  # the arrays split.npz gains


def rows_digest(path: Path, rows: int) -> str:
    """SHA-256 (hex) of the first ``rows`` rows of a class file, sampled as the module says."""
    arr = open_class_file(path)
    starts = np.unique(np.linspace(0, max(rows - BLOCK_ROWS, 0), BLOCKS).round().astype(np.int64))
    h = hashlib.sha256(f"{rows} rows; blocks of {BLOCK_ROWS} at {starts.tolist()}".encode())
    for a in starts.tolist():
        block = as_uint8(np.asarray(arr[a : min(a + BLOCK_ROWS, rows)]), str(path))
        h.update(np.ascontiguousarray(block.reshape(-1, 784)).tobytes())
    return h.hexdigest()


def fingerprint(data: Dataset) -> dict[str, np.ndarray]:
    """The record of ``data``'s class files, as arrays for ``np.savez`` (no pickles needed)."""
    if data.files is None:
        raise ValueError("fingerprint: the dataset does not know its files")
    rows = np.bincount(data.labels, minlength=len(data.class_names)).astype(np.int64)
    return {
        "classes": np.array(data.class_names, dtype=str),
        "class_files": np.array([str(p) for p in data.files], dtype=str),
        "class_rows": rows,
        "class_digest": np.array([rows_digest(p, int(n)) for p, n in zip(data.files, rows, strict=True)], dtype=str),
    }


def saved_record(split_npz: Path) -> dict[str, np.ndarray] | None:
    """The record a run's ``split.npz`` keeps (None: no such file, or one from before records)."""
    if not split_npz.is_file():
        return None
    with np.load(split_npz, allow_pickle=False) as z:
        return {k: z[k] for k in KEYS} if all(k in z for k in KEYS) else None


def changes(saved: dict[str, np.ndarray], data: Dataset) -> list[str]:
    """How ``data``'s class files differ from the ``saved`` record, one phrase per changed file
    (empty when they match). Classes are compared by name; ``data`` has the same ones."""
    now = fingerprint(data)
    where = {str(c): i for i, c in enumerate(now["classes"])}
    found = []
    for c, rows, digest in zip(saved["classes"], saved["class_rows"], saved["class_digest"], strict=True):
        i = where.get(str(c))
        if i is None:
            found.append(f"class {c!r}: no longer in the data")
        elif now["class_rows"][i] != rows:
            found.append(f"{now['class_files'][i]}: {rows} rows at training, {now['class_rows'][i]} now")
        elif now["class_digest"][i] != digest:
            found.append(f"{now['class_files'][i]}: its rows differ from those at training (same count, other digest)")
    return found
