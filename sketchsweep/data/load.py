"""A run's data, from its data config to batches on the device.

``load_data`` generates the synthetic set when asked, then reads a numpy_bitmap folder whole, or
opens it for streaming when it is over the memory budget; ``Placement`` decides once where the
images live while training (resident on the device, or streamed) and hands out the splits.

The data config is ``sketchsweep.config.DataConfig`` or its DictConfig; only its attributes are
read here, so the core stays free of Hydra.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from sketchsweep.data.errors import DataError
from sketchsweep.data.folder import Dataset, class_labels, load_folder, open_class_file, select_files
from sketchsweep.data.stream import RowReader
from sketchsweep.data.synthetic import cache_folder, write_synthetic
from sketchsweep.data.views import Rows, Split, StreamingSplit
from sketchsweep.paths import SYNTHETIC_CACHE

log = logging.getLogger("sketchsweep")


def is_synthetic(cfg) -> bool:
    """Whether a data config asks for the generated sketches. (``config.DataSource`` is a str enum:
    its member equals its name, so this holds for a DictConfig, a dataclass and a plain string.)"""
    return cfg.source == "synthetic"


def synthetic_folder(cfg) -> Path:
    """The cache folder of ``data=synthetic``: under ``data.root``, else ``<project>/data/synthetic``,
    one folder per generator setting."""
    s = cfg.synthetic
    return cache_folder(cfg.root or SYNTHETIC_CACHE, s.num_classes, s.per_class, s.seed)


def data_folder(cfg) -> Path:
    """The numpy_bitmap folder a data config reads (for synthetic data, after generating it)."""
    if is_synthetic(cfg):
        s = cfg.synthetic
        return write_synthetic(synthetic_folder(cfg), s.num_classes, s.per_class, s.seed)
    if not cfg.root:
        raise DataError("data.root: not set; expected data.root=PATH, a folder with one <class>.npy per class")
    return Path(cfg.root).expanduser()


def memory_budget(max_memory_gb: float | None, device: torch.device) -> float:
    """Bytes of images to hold in memory: data.max_memory_gb, or half the RAM (and, on a GPU,
    at most half its memory, since resident data is moved there)."""
    if max_memory_gb is not None:
        return max_memory_gb * 1e9
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory / 2)
    return budget


def load_data(cfg, device: torch.device) -> Dataset:
    """Read (and for synthetic data, first generate) the dataset; every problem is a DataError.

    Data within ``data.max_memory_gb`` is loaded whole; larger data stays on disk and is streamed
    (``Dataset.images`` is then a ``RowReader``)."""
    folder = data_folder(cfg)
    classes = list(cfg.classes) if cfg.classes else None
    files = select_files(folder, classes, cfg.max_per_class)
    counts = [min(len(open_class_file(p)), cfg.max_per_class or sys.maxsize) for p in files.values()]
    size, budget = sum(counts) * 784, memory_budget(cfg.max_memory_gb, device)
    if size <= budget:
        return load_folder(folder, classes, cfg.max_per_class)
    log.info(
        "data is %.2f GB, over the %.2f GB budget (data.max_memory_gb): streaming from disk", size / 1e9, budget / 1e9
    )
    reader = RowReader(list(files.values()), cfg.max_per_class)
    return Dataset(reader, class_labels(reader.counts), list(files), list(files.values()))  # type: ignore[arg-type]


class Placement:
    """Where a run's images live while it trains, decided once: resident (one uint8 copy on the
    device, every split an index into it) or streamed from disk (data over the memory budget)."""

    def __init__(self, data: Dataset, device: torch.device, stream_order: str = "chunks") -> None:
        self.data, self.device, self.stream_order = data, device, stream_order
        self.streamed = isinstance(data.images, RowReader)
        if not self.streamed:
            self.images = torch.from_numpy(data.images).to(device)
            self.labels = torch.from_numpy(data.labels).to(device)

    def split(self, idx: np.ndarray) -> Split | StreamingSplit:
        """Rows ``idx`` of the data, for training and its per-epoch evaluation."""
        if self.streamed:
            return StreamingSplit(self.data.images, self.data.labels, idx, self.device, order=self.stream_order)
        return Split(self.images, self.labels, torch.from_numpy(idx).to(self.device))

    def rows(self, idx: np.ndarray) -> Rows:
        """Rows ``idx`` with their labels, read where they are (evaluation artifacts)."""
        source = self.data.images if self.streamed else self.images
        return Rows(source, self.data.labels[idx], idx, self.device)

    def close(self) -> None:
        if self.streamed:
            self.data.images.close()
