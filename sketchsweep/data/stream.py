"""Read the rows of a numpy_bitmap folder that does not fit the memory budget, straight from disk.

``RowReader`` is the storage side of streaming; ``data.views.StreamingSplit`` turns it into
batches. Reads use ``os.pread`` on the files rather than slicing a memory map: pages touched through a
map count towards the process's resident memory until the kernel drops them, which would let
RSS grow to the size of the dataset. With ``pread`` they sit in the page cache, which the
kernel shares and reclaims.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sketchsweep.data.errors import DataError
from sketchsweep.data.folder import EXPECTED, open_class_file

ROW = 784


class RowReader:
    """Random access to the rows of several uint8 class files, as one concatenated array."""

    def __init__(self, files: list[Path], max_per_class: int | None = None) -> None:
        self.files, self.counts, self.header = list(files), [], []
        for p in self.files:
            arr = open_class_file(p)  # validates the header
            if arr.dtype != np.uint8:  # loading converts floats in [0, 1]; streaming reads the bytes as they are
                fix = "np.save(path, np.rint(np.load(path) * 255).astype(np.uint8))" if arr.dtype.kind == "f" else None
                raise DataError(
                    f"{p}: has dtype {arr.dtype}; streaming (data over data.max_memory_gb) reads {EXPECTED} as stored"
                    + (f": rewrite it as loading converts it (floats in [0, 1]), with {fix}" if fix else "")
                )
            if not arr.flags.c_contiguous:  # a row's pixels are then spread over the whole file
                raise DataError(
                    f"{p}: is stored in Fortran (column) order, which cannot be streamed row by row; expected "
                    f"{EXPECTED} in C (row) order: rewrite it with np.save(path, np.ascontiguousarray(np.load(path)))"
                )
            self.counts.append(min(len(arr), max_per_class or len(arr)))
            self.header.append(arr.offset)
            del arr
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._fds: list[int] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return len(self) * ROW

    def fds(self) -> list[int]:
        if self._fds is None:
            self._fds = [os.open(p, os.O_RDONLY) for p in self.files]
        return self._fds

    def read_rows(self, cls: int, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows (sorted, of one class) into ``out``: one read of the span they cover."""
        first, last = int(rows[0]), int(rows[-1]) + 1
        fd = self.fds()[cls]
        span = os.pread(fd, (last - first) * ROW, self.header[cls] + first * ROW)
        if len(span) != (last - first) * ROW:
            raise DataError(f"{self.files[cls]}: is shorter than its header says (truncated?)")
        out[:] = np.frombuffer(span, dtype=np.uint8).reshape(-1, ROW)[rows - first]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        """Rows at global indices ``idx`` (any order) as ``uint8 (len(idx), 784)``."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), ROW), dtype=np.uint8)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        cls = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        for c in np.unique(cls):
            sel = np.flatnonzero(cls == c)
            block = np.empty((len(sel), ROW), dtype=np.uint8)
            self.read_rows(int(c), sorted_idx[sel] - self.offsets[c], block)
            out[order[sel]] = block
        return out

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows at global indices ``idx`` (any order), reading each run of consecutive rows with
        one ``preadv`` straight into the result. For scattered rows (an exact shuffle), where
        ``__getitem__``'s one-span-per-class reads would read most of every file."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        cls = np.searchsorted(self.offsets, rows, side="right") - 1
        cuts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(cls) != 0)) + 1
        starts, ends = np.concatenate([[0], cuts]), np.append(cuts, len(rows))
        block = np.empty((len(rows), ROW), dtype=np.uint8)
        fds = self.fds()
        runs = zip(starts.tolist(), ends.tolist(), cls[starts].tolist(), rows[starts].tolist(), strict=True)
        for a, b, c, first in runs:
            at = self.header[c] + (first - int(self.offsets[c])) * ROW
            if os.preadv(fds[c], [memoryview(block[a:b]).cast("B")], at) != (b - a) * ROW:
                raise DataError(f"{self.files[c]}: is shorter than its header says (truncated?)")
        out = np.empty_like(block)
        out[order] = block
        return out

    def close(self) -> None:
        for fd in getattr(self, "_fds", None) or []:  # (also called for a reader whose __init__ raised)
            os.close(fd)
        self._fds = None

    # Sweep trials run in one process: a reader dropped without close() must not keep its files open.
    __del__ = close
