"""Streaming from disk: every image once per epoch, reproducible order, same metrics as resident data."""

import threading

import numpy as np
import pytest
import torch

from sketchsweep.data import DataError, load_folder, stratified_split
from sketchsweep.data.folder import class_labels, select_files
from sketchsweep.data.stream import RowReader
from sketchsweep.data.views import Split, StreamingSplit
from sketchsweep.engine import evaluate
from sketchsweep.model import SketchCNN
from sketchsweep.train import train
from tests.conftest import compose_config, rows_with_labels


@pytest.fixture
def streamed(tiny_data):
    files = select_files(tiny_data)
    reader = RowReader(list(files.values()))
    labels = class_labels(reader.counts)
    train_idx, val_idx, _ = stratified_split(labels, list(files), 0.1, seed=0)
    yield load_folder(tiny_data), reader, labels, train_idx, val_idx
    reader.close()


def test_reader_gives_the_same_rows_as_loading(streamed):
    ds, reader, labels, _, _ = streamed
    idx = np.random.default_rng(0).permutation(len(reader))[:100]
    np.testing.assert_array_equal(reader[idx], ds.images[idx])
    np.testing.assert_array_equal(labels, ds.labels)


def test_resident_and_streaming_give_identical_batches_for_the_same_seed(streamed):
    ds, reader, labels, train_idx, _ = streamed
    resident = Split(torch.from_numpy(ds.images), torch.from_numpy(ds.labels), torch.from_numpy(train_idx))
    # A buffer that is not a multiple of the batch, so batches straddle buffers.
    streaming = StreamingSplit(reader, labels, train_idx, torch.device("cpu"), buffer_rows=100, order="exact")
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # two epochs: the generators must stay in step too
        a = list(resident.batches(32, gen_a))
        b = list(streaming.batches(32, gen_b))
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())
    # In order (evaluation), too.
    for (xa, ya), (xb, yb) in zip(resident.batches(50), streaming.batches(50), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_gather_reads_scattered_rows(streamed):
    ds, reader, _, _, _ = streamed
    idx = np.array([5, 4, 6, 479, 0, 120, 119, 5])  # runs, class boundaries, repeats, any order
    np.testing.assert_array_equal(reader.gather(idx), ds.images[idx])


@pytest.mark.parametrize("order", ["exact", "chunks"])
def test_an_epoch_yields_every_image_once_with_its_label(streamed, order):
    ds, reader, labels, train_idx, _ = streamed
    split = StreamingSplit(reader, labels, train_idx, torch.device("cpu"), chunk_rows=8, buffer_rows=96, order=order)
    batches = list(split.batches(32, torch.Generator().manual_seed(0)))
    assert all(len(y) == 32 for _, y in batches[:-1]) and 0 < len(batches[-1][1]) <= 32
    x = torch.cat([b[0] for b in batches]).numpy()
    y = torch.cat([b[1] for b in batches]).numpy()
    assert rows_with_labels(x, y) == rows_with_labels(ds.images[train_idx], ds.labels[train_idx])
    # Shuffled across classes, not class after class.
    assert len(set(batches[0][1].tolist())) > 1
    again = torch.cat([b[0] for b in split.batches(32, torch.Generator().manual_seed(0))]).numpy()
    np.testing.assert_array_equal(x, again)
    other = torch.cat([b[0] for b in split.batches(32, torch.Generator().manual_seed(1))]).numpy()
    assert not np.array_equal(x, other)


def test_evaluation_matches_resident_data(streamed):
    ds, reader, labels, _, val_idx = streamed
    model = SketchCNN(4, width=4, hidden=8)
    resident = Split(torch.from_numpy(ds.images[val_idx]), torch.from_numpy(ds.labels[val_idx]))
    streaming = StreamingSplit(reader, labels, val_idx, torch.device("cpu"), chunk_rows=5, buffer_rows=17)
    a, b = evaluate(model, resident, batch_size=10), evaluate(model, streaming, batch_size=10)
    assert a.keys() == b.keys() and all(np.isclose(a[k], b[k]) for k in a)


def test_stopping_early_ends_the_reader_thread(streamed):
    _, reader, labels, train_idx, _ = streamed
    split = StreamingSplit(reader, labels, train_idx, torch.device("cpu"), chunk_rows=4, buffer_rows=8, prefetch=1)
    before = threading.active_count()
    for i, _ in enumerate(split.batches(4, torch.Generator().manual_seed(0))):
        if i == 1:
            break
    assert threading.active_count() == before


def test_a_file_truncated_while_streaming_is_a_clear_error(tmp_path):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.full((100, 784), 7, np.uint8))
    reader = RowReader([tmp_path / "a.npy", tmp_path / "b.npy"])
    labels = class_labels(reader.counts)
    with open(tmp_path / "b.npy", "r+b") as f:
        f.truncate(128 + 784 * 10)
    split = StreamingSplit(reader, labels, np.arange(200), torch.device("cpu"), buffer_rows=50)
    with pytest.raises(DataError, match=r"b\.npy: is shorter than its header says"):
        list(split.batches(10, torch.Generator().manual_seed(0)))


def test_streaming_needs_uint8_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 784), np.int16))
    with pytest.raises(DataError, match=r"int16; streaming .* reads"):
        RowReader([tmp_path / "a.npy"])


def test_a_float_file_is_refused_when_streamed_with_the_rewrite_that_streams_it_as_loaded(tmp_path):
    """Loading converts floats in [0, 1]; streaming reads bytes as stored, so it refuses them, naming the
    file and a one-line rewrite; after that rewrite the file streams exactly as the float file loaded."""
    np.save(tmp_path / "a.npy", np.zeros((20, 784), np.uint8))
    path = tmp_path / "b.npy"
    np.save(path, np.random.default_rng(0).random((30, 28, 28), dtype=np.float32))
    loaded = load_folder(tmp_path).images
    with pytest.raises(DataError, match=r"float32") as err:
        RowReader([tmp_path / "a.npy", path])
    assert str(path) in str(err.value) and "with np.save(path, " in str(err.value)
    eval(str(err.value).split(" with ")[-1], {"np": np, "path": path})  # the rewrite, as printed
    reader = RowReader([tmp_path / "a.npy", path])
    try:
        np.testing.assert_array_equal(reader[np.arange(50)], loaded)
    finally:
        reader.close()


def test_training_streams_when_data_exceeds_the_budget(tiny_data, tmp_path, store, caplog):
    common = [
        "data=quickdraw",
        f"data.root={tiny_data}",
        "model.width=8",
        "trainer.epochs=3",
        "trainer.batch_size=32",
        f"mlflow.tracking_uri={store}",
        "mlflow.log_onnx=false",
    ]
    # 100 kB: the 376 kB tiny set must stream. Evaluation artifacts then read the val rows from disk.
    # data.stream_order=exact: the resident path's order, so the two runs below see the same batches.
    cfg = compose_config([*common, "data.max_memory_gb=0.0001", "data.stream_order=exact", "mlflow.log_model=true"])
    with caplog.at_level("INFO", logger="sketchsweep"):
        value = train(cfg, tmp_path / "streamed")
    assert "streaming from disk" in caplog.text
    assert value > 0.5  # 4 classes: chance is 0.25
    # The same run with the data resident: same batches, so the very same weights (on a CPU).
    assert (tmp_path / "streamed" / "evaluation" / "confusion_matrix.png").is_file()
    resident = train(
        compose_config([*common, "mlflow.log_model=false", "mlflow.log_evaluation=false"]), tmp_path / "resident"
    )
    assert resident == value
    a = torch.load(tmp_path / "streamed" / "model_weights.pth", weights_only=True)
    b = torch.load(tmp_path / "resident" / "model_weights.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_dropped_reader_closes_its_files(tiny_data):
    """Sweep trials run in one process: each trial's reader must not leave its files open."""
    import gc
    import os

    files = list(select_files(tiny_data).values())
    gc.collect()  # readers other tests dropped close their files now, not during the count
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        reader = RowReader(files)
        reader.gather(np.arange(10))  # opens one descriptor per class file
        assert len(os.listdir("/proc/self/fd")) >= before + len(files)
        del reader
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def write_npy(path, header: dict, data: bytes, version: int = 1) -> None:
    """A .npy written byte by byte, for headers np.save does not produce (big-endian uint8, ...)."""
    text = repr(header).encode("latin1")
    size = 2 if version == 1 else 4
    pad = -(8 + size + len(text) + 1) % 64
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY" + bytes([version, 0]) + (len(text) + pad + 1).to_bytes(size, "little"))
        f.write(text + b" " * pad + b"\n" + data)


def header_variants(path, a):
    """Every way to store the rows ``a`` (uint8 (N, 784)) that np.load reads back as them."""
    flat, square = {"shape": a.shape, "fortran_order": False}, {"shape": (len(a), 28, 28), "fortran_order": False}
    return {
        "v1": lambda: np.save(path, a),
        "v2": lambda: write_npy(path, {"descr": "|u1", **flat}, a.tobytes(), version=2),
        "v3": lambda: write_npy(path, {"descr": "|u1", **flat}, a.tobytes(), version=3),
        "big-endian": lambda: write_npy(path, {"descr": ">u1", **flat}, a.tobytes()),
        "little-endian": lambda: write_npy(path, {"descr": "<u1", **flat}, a.tobytes()),
        "square": lambda: np.save(path, a.reshape(-1, 28, 28)),
        "fortran": lambda: np.save(path, np.asfortranarray(a)),
        "fortran square": lambda: np.save(path, np.asfortranarray(a.reshape(-1, 28, 28))),
        "fortran v2": lambda: write_npy(
            path, {"descr": "|u1", **flat, "fortran_order": True}, a.tobytes(order="F"), version=2
        ),
        "fortran square v3": lambda: write_npy(
            path, {"descr": "|u1", **square, "fortran_order": True}, a.reshape(-1, 28, 28).tobytes(order="F"), 3
        ),
    }


@pytest.mark.parametrize("variant", sorted(header_variants(None, np.zeros((1, 784), np.uint8))))
def test_streamed_and_resident_reads_agree_on_every_header(tmp_path, variant):
    """A file np.load reads right is streamed right too, or refused by name; never read scrambled."""
    a = np.random.default_rng(0).integers(0, 256, (50, 784), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a[::-1].copy())
    path = tmp_path / "b.npy"
    header_variants(path, a)[variant]()
    np.testing.assert_array_equal(np.load(path).reshape(-1, 784), a)  # what np.load makes of it
    resident = load_folder(tmp_path)
    np.testing.assert_array_equal(resident.images[50:], a)
    try:
        reader = RowReader([tmp_path / "a.npy", path])
    except DataError as e:  # refused, by name and saying why
        assert str(path) in str(e) and "order" in str(e)
        return
    idx = np.random.default_rng(1).permutation(100)
    try:
        np.testing.assert_array_equal(reader[idx], resident.images[idx])
        np.testing.assert_array_equal(reader.gather(idx), resident.images[idx])
    finally:
        reader.close()
