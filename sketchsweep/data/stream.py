"""Stream a numpy_bitmap folder that does not fit the memory budget.

Rows are read from the class files in shuffled chunks of consecutive rows by a background
thread, shuffled again inside a buffer of many chunks, and handed to the training loop as
batches on the device (through pinned memory on CUDA, copied without blocking). Memory stays
bounded by a few buffers, whatever the size of the data.

Reads use ``os.pread`` on the files rather than slicing a memory map: pages touched through a
map count towards the process's resident memory until the kernel drops them, which would let
RSS grow to the size of the dataset. With ``pread`` they sit in the page cache, which the
kernel shares and reclaims.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sketchsweep.data.folder import EXPECTED, DataError, open_class_file

ROW = 784


class RowReader:
    """Random access to the rows of several uint8 class files, as one concatenated array."""

    def __init__(self, files: list[Path], max_per_class: int | None = None) -> None:
        self.files, self.counts, self.header = list(files), [], []
        for p in self.files:
            arr = open_class_file(p)  # validates the header
            if arr.dtype != np.uint8:
                raise DataError(f"{p}: has dtype {arr.dtype}; streaming reads {EXPECTED} as stored on disk")
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

    def close(self) -> None:
        for fd in self._fds or []:
            os.close(fd)
        self._fds = None


class StreamingSplit:
    """A split read from disk while training: the same interface as ``engine.Split``."""

    def __init__(
        self,
        reader: RowReader,
        labels: np.ndarray,
        indices: np.ndarray,
        device: torch.device,
        chunk_rows: int = 256,
        buffer_rows: int = 65536,
        prefetch: int = 2,
    ) -> None:
        self.reader, self._device = reader, torch.device(device)
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.labels = np.asarray(labels)[self.indices].astype(np.int64)
        self.buffer_rows, self.prefetch = buffer_rows, prefetch
        # Chunks: runs of up to chunk_rows consecutive indices of one class, read in one go.
        cls = np.searchsorted(reader.offsets, self.indices, side="right") - 1
        cuts = np.flatnonzero(np.diff(cls)) + 1
        starts = np.unique(np.concatenate([[0], cuts, np.arange(0, len(self.indices), chunk_rows)]))
        self.chunks = np.stack([starts, np.append(starts[1:], len(self.indices))], axis=1)
        self.chunk_class = cls[starts]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def device(self) -> torch.device:
        return self._device

    def _buffers(self, order: np.ndarray, rng: np.random.Generator | None, rows: int, out: queue.Queue, stop) -> None:
        """Producer thread: fill buffers of ``rows`` images from chunks in ``order``."""
        try:
            pos = 0
            while pos < len(order) and not stop.is_set():
                take, n = [], 0
                while pos < len(order) and n < rows:
                    a, b = self.chunks[order[pos]]
                    take.append(order[pos])
                    n += b - a
                    pos += 1
                images = np.empty((n, ROW), dtype=np.uint8)
                labels = np.empty(n, dtype=np.int64)
                at = 0
                for k in take:
                    a, b = self.chunks[k]
                    c = int(self.chunk_class[k])
                    self.reader.read_rows(c, self.indices[a:b] - self.reader.offsets[c], images[at : at + b - a])
                    labels[at : at + b - a] = self.labels[a:b]
                    at += b - a
                if rng is not None:  # mix the chunks: a batch draws from many classes and files
                    perm = rng.permutation(n)
                    images, labels = images[perm], labels[perm]
                x, y = torch.from_numpy(images), torch.from_numpy(labels)
                if self._device.type == "cuda":
                    x, y = x.pin_memory(), y.pin_memory()
                out.put((x, y))
            out.put(None)
        except BaseException as e:  # hand any failure to the consumer, which re-raises it
            out.put(e)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches on the device; shuffled when ``generator`` is given (its state decides the
        order, so a checkpointed generator replays the same epoch)."""
        rng = None
        order = np.arange(len(self.chunks))
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(self.chunks))
        rows = max(1, self.buffer_rows // batch_size) * batch_size  # whole batches per buffer
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._buffers, args=(order, rng, rows, q, stop), daemon=True)
        worker.start()
        try:
            carry: tuple[torch.Tensor, torch.Tensor] | None = None
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y = item
                if carry is not None:  # a buffer cut short by a class boundary: keep batches whole
                    x, y = torch.cat([carry[0], x]), torch.cat([carry[1], y])
                    carry = None
                end = len(y) - len(y) % batch_size
                for i in range(0, end, batch_size):
                    yield (
                        x[i : i + batch_size].to(self._device, non_blocking=True),
                        y[i : i + batch_size].to(self._device, non_blocking=True),
                    )
                if end < len(y):
                    carry = (x[end:], y[end:])
            if carry is not None:
                yield carry[0].to(self._device), carry[1].to(self._device)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()
