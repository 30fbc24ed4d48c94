"""The numpy_bitmap loader, its errors, the split and the synthetic generator."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sketchsweep.data import DataError, load_folder, stratified_split, write_synthetic
from sketchsweep.data.synthetic import SHAPES, draw_class
from tests.conftest import PROJECT_ROOT, SHARED_QUICKDRAW, cli_env


def bitmaps(n, value=255, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 784)) < 0.2).astype(np.uint8) * value


def make_folder(tmp_path, files):
    root = tmp_path / "qd"
    root.mkdir()
    for name, arr in files.items():
        np.save(root / name, arr)
    return root


def test_labels_follow_sorted_file_names(tmp_path):
    root = make_folder(tmp_path, {"dog.npy": bitmaps(3), "cat.npy": bitmaps(5), "ant.npy": bitmaps(2)})
    ds = load_folder(root)
    assert ds.class_names == ["ant", "cat", "dog"]
    assert ds.images.dtype == np.uint8 and ds.images.shape == (10, 784)
    assert ds.labels.tolist() == [0] * 2 + [1] * 5 + [2] * 3
    np.testing.assert_array_equal(ds.images[2:7], np.load(root / "cat.npy"))


def test_google_file_names_subset_and_cap(tmp_path):
    root = make_folder(
        tmp_path,
        {
            "full_numpy_bitmap_traffic light.npy": bitmaps(6, seed=1),
            "full_numpy_bitmap_cat.npy": bitmaps(6, seed=2),
            "full_numpy_bitmap_dog.npy": bitmaps(6, seed=3),
        },
    )
    ds = load_folder(root, classes=["traffic light", "cat"], max_per_class=4)
    assert ds.class_names == ["cat", "traffic light"]
    assert len(ds.images) == 8
    np.testing.assert_array_equal(ds.images[4:], bitmaps(6, seed=1)[:4])  # first N rows
    with pytest.raises(DataError, match=r"data\.classes: unknown class 'cow'; no close match in the folder"):
        load_folder(root, classes=["cow", "cat"])
    with pytest.raises(DataError, match="did you mean 'traffic light'"):
        load_folder(root, classes=["trafic light"])
    assert load_folder(root, classes=["traffic_light", "dog"]).class_names == ["dog", "traffic light"]


def test_floats_in_unit_range_and_square_images_are_accepted(tmp_path):
    root = make_folder(tmp_path, {"a.npy": bitmaps(3) / 255.0, "b.npy": bitmaps(3).reshape(3, 28, 28)})
    ds = load_folder(root)
    np.testing.assert_array_equal(ds.images[:3], bitmaps(3))
    np.testing.assert_array_equal(ds.images[3:], bitmaps(3))


BAD_FILES = {
    "wrong shape": (lambda p: np.save(p, np.zeros((5, 100), np.uint8)), "shape"),
    "wrong image size": (lambda p: np.save(p, np.zeros((5, 32, 32), np.uint8)), "shape"),
    "1-d": (lambda p: np.save(p, np.zeros(784, np.uint8)), "shape"),
    "no rows": (lambda p: np.save(p, np.zeros((0, 784), np.uint8)), "no rows"),
    "floats over 1": (lambda p: np.save(p, np.full((2, 784), 255.0)), r"floats in \[0, 1\]"),
    "ints": (lambda p: np.save(p, np.full((2, 784), 1, np.int64)), "dtype int64"),
    "nan": (lambda p: np.save(p, np.full((2, 784), np.nan)), r"floats in \[0, 1\]"),
    "strings": (lambda p: np.save(p, np.full((2, 784), "x")), "dtype"),
    "pickled objects": (lambda p: np.save(p, np.array([{"a": 1}] * 2, dtype=object)), "pickled object array"),
    "truncated": (lambda p: (np.save(p, bitmaps(50)), p.write_bytes(p.read_bytes()[:-1000])), "cannot be read"),
    "not npy": (lambda p: p.write_text("hello, I am a csv\n1,2,3\n"), "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_clear_error_naming_it(tmp_path, case):
    write, message = BAD_FILES[case]
    root = make_folder(tmp_path, {"good.npy": bitmaps(4)})
    bad = root / "bad.npy"
    write(bad)
    with pytest.raises(DataError, match=message) as err:
        load_folder(root)
    assert str(bad) in str(err.value)
    assert "expected" in str(err.value)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no \.npy files"):
        load_folder(tmp_path / "empty")
    root = make_folder(tmp_path, {"only.npy": bitmaps(3)})
    with pytest.raises(DataError, match="at least 2"):
        load_folder(root)


NAMES = ["ant", "bee", "cat", "dog", "eel"]


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(5), [100, 50, 30, 20, 10])
    train, val, test = stratified_split(labels, NAMES, 0.1, seed=3)
    assert len(test) == 0
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [10, 5, 3, 2, 1]
    np.testing.assert_array_equal(val, stratified_split(labels, NAMES, 0.1, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, NAMES, 0.1, seed=4)[1])
    with pytest.raises(DataError, match="val_fraction"):
        stratified_split(labels, NAMES, 1.5, seed=0)


def test_split_with_a_test_fraction():
    labels = np.repeat(np.arange(5), 40)
    train, val, test = stratified_split(labels, NAMES, 0.1, seed=0, test_fraction=0.2)
    assert np.bincount(labels[test]).tolist() == [8] * 5 and np.bincount(labels[val]).tolist() == [4] * 5
    assert len(np.union1d(np.union1d(train, val), test)) == len(labels) == len(train) + len(val) + len(test)
    with pytest.raises(DataError, match="too few"):
        stratified_split(np.array([0, 0, 1, 1]), NAMES[:2], 0.1, seed=0, test_fraction=0.1)


def test_a_class_split_does_not_depend_on_the_other_classes():
    """Same split_seed -> same validation drawings of "dog", whichever classes sit beside it."""
    labels = np.repeat(np.arange(3), 50)
    _, val_a, _ = stratified_split(labels, ["cat", "dog", "eel"], 0.2, seed=0)
    _, val_b, _ = stratified_split(labels, ["ant", "bee", "dog"], 0.2, seed=0)
    np.testing.assert_array_equal(val_a[labels[val_a] == 1] - 50, val_b[labels[val_b] == 2] - 100)


def test_duplicate_class_names_after_prefix_stripping(tmp_path):
    root = make_folder(
        tmp_path, {"cat.npy": bitmaps(3), "full_numpy_bitmap_cat.npy": bitmaps(3), "dog.npy": bitmaps(3)}
    )
    with pytest.raises(DataError, match="'cat' is also given by") as err:
        load_folder(root)
    assert "full_numpy_bitmap_cat.npy" in str(err.value)


def test_underscore_and_space_names_are_one_class(tmp_path):
    """Names are matched with "_" and space alike, so two such files would be one class trained as two."""
    root = make_folder(
        tmp_path, {"traffic light.npy": bitmaps(3), "traffic_light.npy": bitmaps(3, seed=1), "dog.npy": bitmaps(3)}
    )
    for classes in (None, ["traffic_light", "dog"]):
        with pytest.raises(DataError, match="same class") as err:
            load_folder(root, classes=classes)
        assert "traffic light.npy" in str(err.value) and "traffic_light.npy" in str(err.value)


def test_synthetic_cache_folder_gets_permissions_per_umask(tmp_path):
    """A shared cache must be readable by others: not mkdtemp's 0700."""
    old = os.umask(0o022)
    try:
        root = write_synthetic(tmp_path / "syn", num_classes=2, per_class=4, seed=0)
    finally:
        os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in root.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_generation_leaves_no_temporary_folder(tmp_path, signum):
    """kill (SIGTERM) or Ctrl-C while the synthetic set is being drawn: no half-made folder is left."""
    code = "import sys; from sketchsweep.data import write_synthetic; write_synthetic(sys.argv[1], 10, 200000, 0)"
    dst = tmp_path / "cache" / "syn"
    proc = subprocess.Popen([sys.executable, "-c", code, str(dst)], cwd=PROJECT_ROOT, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while not (dst.parent.is_dir() and any(dst.parent.iterdir())):  # the temporary folder is there
            assert proc.poll() is None, "generation ended before it could be interrupted"
            assert time.monotonic() < deadline, "no temporary folder appeared"
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert list(dst.parent.iterdir()) == []


def test_synthetic_is_deterministic_and_in_the_real_format(tmp_path):
    assert len(SHAPES) >= 10
    root = write_synthetic(tmp_path / "syn", num_classes=10, per_class=20, seed=7)
    ds = load_folder(root)
    assert ds.class_names == sorted(SHAPES)
    assert ds.images.shape == (200, 784) and ds.images.dtype == np.uint8
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert json.loads((root / "manifest.json").read_text())["seed"] == 7
    np.testing.assert_array_equal(draw_class("star", 20, 7), np.load(root / "star.npy"))
    assert not np.array_equal(draw_class("star", 20, 8), np.load(root / "star.npy"))
    # Every drawing has ink, framed like Google's: nothing on the outer pixel ring.
    imgs = ds.images.reshape(-1, 28, 28)
    assert (imgs.reshape(len(imgs), -1) > 0).sum(1).min() > 20
    assert imgs[:, [0, -1], :].max() == 0 and imgs[:, :, [0, -1]].max() == 0


def test_synthetic_classes_are_distinct():
    """Class means differ more between classes than drawings vary within a class."""
    means = np.stack([draw_class(name, 60, 0).astype(np.float32).mean(0) for name in SHAPES])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(len(SHAPES), dtype=bool)].min() > 100


def test_synthetic_rejects_impossible_sizes(tmp_path):
    with pytest.raises(DataError, match="num_classes"):
        write_synthetic(tmp_path / "x", num_classes=len(SHAPES) + 1)


@pytest.mark.skipif(not SHARED_QUICKDRAW.is_dir(), reason="real Quick, Draw! data not present in ../shared/data")
def test_real_quickdraw_folder_loads():
    ds = load_folder(SHARED_QUICKDRAW, max_per_class=200)
    assert len(ds.class_names) == 24 and ds.class_names == sorted(ds.class_names)
    assert ds.images.shape == (24 * 200, 784) and ds.images.dtype == np.uint8
    # Google's bitmaps: background 0, strokes up to 255, ink on roughly a fifth of the pixels.
    assert ds.images.max() == 255 and 0.1 < (ds.images > 0).mean() < 0.4
