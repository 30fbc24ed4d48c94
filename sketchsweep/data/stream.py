"""Stream a numpy_bitmap folder that does not fit the memory budget.

A background thread reads the rows of the next buffers while the training loop works on the
current one; batches go to the device through pinned memory on CUDA, copied without blocking.
By default (``order="chunks"``) it reads shuffled chunks of consecutive rows and shuffles again
inside a buffer of many chunks: sequential reads, fast from any disk. ``order="exact"`` gives
exactly the resident path's shuffled order (same seed, same batches) at the price of scattered
reads, which a cold disk serves several times slower (benchmarks/README.md). Memory stays
bounded by a few buffers, whatever the size of the data.

Reads use ``os.pread`` on the files rather than slicing a memory map: pages touched through a
map count towards the process's resident memory until the kernel drops them, which would let
RSS grow to the size of the dataset. With ``pread`` they sit in the page cache, which the
kernel shares and reclaims.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sketchsweep.data.folder import EXPECTED, DataError, open_class_file
from sketchsweep.engine import epoch_permutation

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


class StreamingSplit:
    """A split read from disk while training: the same interface as ``engine.Split``.

    ``order="chunks"`` (the default) shuffles runs of ``chunk_rows`` consecutive rows and then
    within a buffer: long sequential reads. ``order="exact"`` shuffles like the resident path, with
    the same permutation from the same generator, so a run gives the same batches whether its
    data fits in memory or not; it reads rows one by one (page cache or SSD speed).
    """

    def __init__(
        self,
        reader: RowReader,
        labels: np.ndarray,
        indices: np.ndarray,
        device: torch.device,
        chunk_rows: int = 256,
        buffer_rows: int = 65536,
        prefetch: int = 2,
        order: str = "chunks",
    ) -> None:
        if order not in ("exact", "chunks"):
            raise ValueError(f"StreamingSplit order={order!r}: expected 'exact' or 'chunks'")
        self.reader, self._device, self.order = reader, torch.device(device), order
        self.given = np.asarray(indices, dtype=np.int64)  # the split's rows in its own order, as Split keeps them
        self.all_labels = np.asarray(labels).astype(np.int64, copy=False)
        self.indices = np.sort(self.given)
        self.labels = self.all_labels[self.indices]
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

    def _produce(self, buffers: Iterator[tuple[np.ndarray, np.ndarray]], out: queue.Queue, stop) -> None:
        """Producer thread: put ``buffers`` (pinned on CUDA) on ``out`` until done or stopped."""
        try:
            for images, labels in buffers:
                if stop.is_set():
                    break
                x, y = torch.from_numpy(images), torch.from_numpy(labels)
                if self._device.type == "cuda":
                    x, y = x.pin_memory(), y.pin_memory()
                out.put((x, y))
            out.put(None)
        except BaseException as e:  # hand any failure to the consumer, which re-raises it
            out.put(e)

    def _exact_buffers(self, rows_in_order: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Buffers of ``rows`` images in exactly the given order."""
        for pos in range(0, len(rows_in_order), rows):
            take = rows_in_order[pos : pos + rows]
            yield self.reader.gather(take), self.all_labels[take]

    def _chunk_buffers(
        self, order: np.ndarray, rng: np.random.Generator | None, rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Buffers of about ``rows`` images from whole chunks in ``order``, shuffled within."""
        pos = 0
        while pos < len(order):
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
            yield images, labels

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches on the device; shuffled when ``generator`` is given (its state decides the
        order, so a checkpointed generator replays the same epoch)."""
        rows = max(1, self.buffer_rows // batch_size) * batch_size  # whole batches per buffer
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        if self.order == "exact":
            take = self.given
            if generator is not None:
                take = take[epoch_permutation(len(take), generator).numpy()]
            buffers = self._exact_buffers(take, rows)
        else:
            rng = None
            order = np.arange(len(self.chunks))
            if generator is not None:
                seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                rng = np.random.default_rng(seed)
                order = rng.permutation(len(self.chunks))
            buffers = self._chunk_buffers(order, rng, rows)
        worker = threading.Thread(target=self._produce, args=(buffers, q, stop), daemon=True)
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
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
            worker.join()
