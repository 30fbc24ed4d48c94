"""The rows of a split, batch by batch: three views with one interface.

Each has ``len()``, ``device`` and ``batches(batch_size, generator=None)``, which yields
``(uint8 images (B, 784), labels)`` on ``device``: in order, or shuffled by ``generator`` (a CPU
generator, so the order is reproducible and its state can be checkpointed).

- ``Split``: data resident on the training device, the split an index into it (training's path).
- ``StreamingSplit``: data read from disk by a ``RowReader`` while the model trains, through a
  background thread and pinned memory (data over ``data.max_memory_gb``).
- ``Rows``: images kept where they are (a NumPy array, a tensor, a ``RowReader``) and moved to the
  device one batch at a time (evaluation and prediction, on any data).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sketchsweep.data.stream import ROW, RowReader

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Split:
    """A split of data resident on the training device: all images once, and this split's rows
    as an index into them, so train/val/test never hold copies."""

    images: torch.Tensor  # uint8 (N, 784), on the training device
    labels: torch.Tensor  # int64 (N,), on the training device
    index: torch.Tensor | None = None  # rows of this split (on the device); None: all rows

    def __len__(self) -> int:
        return len(self.labels) if self.index is None else len(self.index)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        if generator is None and self.index is None:
            for i in range(0, len(self), batch_size):
                yield self.images[i : i + batch_size], self.labels[i : i + batch_size]
            return
        order = self.index
        if generator is not None:
            perm = epoch_permutation(len(self), generator).to(self.device)
            order = perm if order is None else order[perm]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            # index_select, not images[idx]: on a CPU advanced indexing of uint8 rows is ~10x slower.
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)


def epoch_permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """The order of an epoch's rows. Drawn on the CPU from the run's checkpointed generator, and
    shared with ``StreamingSplit``: the same seed gives the same batches resident or streamed."""
    return torch.randperm(n, generator=generator)


class StreamingSplit:
    """A split read from disk while training: a thread reads the next buffers of rows (pinned on
    CUDA) while the model trains on the current one, and batches go to the device without blocking.
    Memory stays bounded by a few buffers, whatever the size of the data.

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

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
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


class Rows:
    """Rows of images kept where they are (a NumPy array, a tensor on any device, or a ``RowReader``
    on disk), with their labels (one per row of the view, or None): each batch is read when it is
    needed and moved to ``device``, so a subset of data that does not fit in memory is never copied
    whole. ``index`` picks and orders the rows (None: all)."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor | RowReader,
        labels: np.ndarray | torch.Tensor | None = None,
        index: np.ndarray | torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.images = images
        self.index = index.cpu().numpy() if isinstance(index, torch.Tensor) else index
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64).cpu()
        here = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        self._device = torch.device(device) if device is not None else here
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError(f"{len(self)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images) if self.index is None else len(self.index)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> Rows:
        """The same rows, with batches delivered to ``device``."""
        return Rows(self.images, self.labels, self.index, device)

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """The images at ``positions`` of this view, as uint8 ``(len(positions), 784)`` on the device."""
        rows = np.asarray(positions, dtype=np.int64) if self.index is None else self.index[positions]
        if isinstance(self.images, torch.Tensor):
            part = self.images.index_select(0, torch.as_tensor(rows, device=self.images.device))
        elif isinstance(self.images, RowReader):  # just these rows, not the spans between them
            part = torch.from_numpy(self.images.gather(rows))
        else:
            part = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        return part.reshape(-1, ROW).to(self._device, non_blocking=True)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Labels are None when the view has none (prediction)."""
        n = len(self)
        order = epoch_permutation(n, generator).numpy() if generator is not None else None
        sliceable = order is None and self.index is None and not isinstance(self.images, RowReader)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            pos = order[start:stop] if order is not None else np.arange(start, stop)
            if sliceable:  # a view of the array, no gather
                part = self.images[start:stop]
                part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(part))
                images = part.reshape(-1, ROW).to(self._device, non_blocking=True)
            else:
                images = self.take(pos)
            labels = None if self.labels is None else self.labels[torch.from_numpy(pos)].to(self._device)
            yield images, labels
