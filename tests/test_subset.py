"""Making a smaller numpy_bitmap folder with a manifest."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sketchsweep.config import PROJECT_ROOT
from sketchsweep.data import DataError, load_folder
from sketchsweep.data.subset import make_subset
from tests.conftest import SHARED_QUICKDRAW, cli_env
from tests.test_ndjson import run_hooked


def rows(n, offset):
    """Rows whose first pixel is their index (+ offset): easy to trace back to the source."""
    arr = np.zeros((n, 784), np.uint8)
    arr[:, 0] = (np.arange(n) + offset) % 256
    arr[:, 1] = np.arange(n) // 256
    return arr


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i, name in enumerate(["ant", "bee", "cat", "dog", "eel"]):
        np.save(root / f"{name}.npy", rows(300 + 10 * i, 7 * i))
    return root


def test_first_mode_keeps_the_first_rows(src, tmp_path):
    dst = make_subset(src, tmp_path / "sub", per_class=50, classes=["cat", "ant"])
    assert sorted(p.name for p in dst.iterdir()) == ["ant.npy", "cat.npy", "manifest.json"]
    np.testing.assert_array_equal(np.load(dst / "cat.npy"), np.load(src / "cat.npy")[:50])
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["source"] == str(src.resolve()) and manifest["mode"] == "first" and manifest["per_class"] == 50
    assert manifest["classes"]["cat"]["rows"] == 50 and manifest["classes"]["cat"]["source_rows"] == 320
    for name, entry in manifest["classes"].items():
        assert entry["sha256"] == hashlib.sha256((dst / f"{name}.npy").read_bytes()).hexdigest()
    # Fewer rows than asked: all of them.
    big = make_subset(src, tmp_path / "big", per_class=10_000, classes=["ant"])
    assert np.load(big / "ant.npy").shape == (300, 784)


def test_random_mode_is_seeded_ordered_and_a_subset(src, tmp_path):
    a = np.load(make_subset(src, tmp_path / "a", 40, ["bee"], seed=1, mode="random") / "bee.npy")
    b = np.load(make_subset(src, tmp_path / "b", 40, ["bee", "dog"], seed=1, mode="random") / "bee.npy")
    c = np.load(make_subset(src, tmp_path / "c", 40, ["bee"], seed=2, mode="random") / "bee.npy")
    np.testing.assert_array_equal(a, b)  # same seed, other classes chosen: same rows
    assert not np.array_equal(a, c)
    source = np.load(src / "bee.npy")
    idx = a[:, 1].astype(int) * 256 + (a[:, 0].astype(int) - 7) % 256
    assert len(a) == 40 and len(set(idx)) == 40 and np.all(np.diff(idx) > 0)  # distinct, original order
    np.testing.assert_array_equal(a, source[idx])
    assert not np.array_equal(idx, np.arange(40))


def test_num_classes_is_seeded(src, tmp_path):
    picks = {}
    for seed in range(6):
        manifest = json.loads(
            (make_subset(src, tmp_path / f"s{seed}", 5, num_classes=3, seed=seed) / "manifest.json").read_text()
        )
        picks[seed] = list(manifest["classes"])
        assert len(picks[seed]) == 3 and picks[seed] == sorted(picks[seed])
    assert len({tuple(p) for p in picks.values()}) > 1
    again = json.loads((make_subset(src, tmp_path / "again", 5, num_classes=3, seed=4) / "manifest.json").read_text())
    assert list(again["classes"]) == picks[4]
    assert len(json.loads((make_subset(src, tmp_path / "all", 5) / "manifest.json").read_text())["classes"]) == 5
    with pytest.raises(DataError, match="num_classes"):
        make_subset(src, tmp_path / "x", 5, num_classes=9)
    with pytest.raises(DataError, match=r"\['cow'\] not found"):
        make_subset(src, tmp_path / "x", 5, classes=["cow"])
    assert not (tmp_path / "x").exists()


def test_non_empty_destination_is_refused_unless_forced(src, tmp_path):
    dst = tmp_path / "sub"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"not empty.*--force"):
        make_subset(src, dst, 5, ["ant"])
    assert (dst / "keep.txt").read_text() == "mine"
    make_subset(src, dst, 5, ["ant"], force=True)
    assert sorted(p.name for p in dst.iterdir()) == ["ant.npy", "manifest.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    make_subset(src, empty, 5, ["ant"])  # an empty folder is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_the_subset_folder_gets_permissions_per_umask(src, tmp_path):
    """A finished data folder is like any other the user makes (others may read it), not mkdtemp's 0700."""
    old = os.umask(0o022)
    try:
        dst = make_subset(src, tmp_path / "sub", 5, ["ant"])
        forced = make_subset(src, dst, 5, ["bee"], force=True)
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == forced.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in dst.iterdir()} == {0o644}


def test_bad_source_file_gives_loader_error_and_no_destination(src, tmp_path):
    bad = src / "bee.npy"
    np.save(bad, np.zeros((5, 28, 3), np.uint8))
    for mode in ("first", "random"):
        with pytest.raises(DataError, match="shape") as err:
            make_subset(src, tmp_path / "sub", 5, mode=mode)
        assert str(bad) in str(err.value)
    np.save(bad, np.full((5, 784), 300.0))  # a bad header passes; its values do not
    with pytest.raises(DataError, match="values span") as err:
        make_subset(src, tmp_path / "sub", 5, mode="random")
    assert str(bad) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sketchsweep.data.subset", *map(str, args)],
        cwd=PROJECT_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli(src, tmp_path):
    ok = run_cli(src, tmp_path / "sub", "--per-class", 20, "--classes", "ant,dog", "--mode", "random", "--seed", 3)
    assert ok.returncode == 0, ok.stderr
    assert "2 classes, 40 rows" in ok.stdout
    assert json.loads((tmp_path / "sub" / "manifest.json").read_text())["seed"] == 3
    refused = run_cli(src, tmp_path / "sub", "--per-class", 20)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert run_cli(src, tmp_path / "sub", "--per-class", 20, "--num-classes", 2, "--force").returncode == 0
    assert len(list((tmp_path / "sub").glob("*.npy"))) == 2


@pytest.mark.skipif(not SHARED_QUICKDRAW.is_dir(), reason="real Quick, Draw! data not present in ../shared/data")
def test_real_subset_loads(tmp_path):
    dst = make_subset(SHARED_QUICKDRAW, tmp_path / "real", per_class=100, num_classes=3, seed=0, mode="random")
    ds = load_folder(dst)
    assert len(ds.class_names) == 3 and ds.images.shape == (300, 784) and ds.images.dtype == np.uint8
    assert ds.class_names == list(json.loads((dst / "manifest.json").read_text())["classes"])


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_force_keeps_the_old_subset_when_the_new_one_cannot_be_put_in_place(src, tmp_path):
    """--force moves the old subset aside, then renames the new one in; when that rename fails (here the
    new folder is made immutable, chattr +i, as the old one is moved aside) the old one is put back whole,
    and the error is one line."""
    dst = make_subset(src, tmp_path / "sub", 5, ["ant"])
    before = folder_bytes(dst)
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.rmdir()
    new = f"[p for p in glob.glob({str(tmp_path / '.sub-*')!r}) if '-old-' not in p]"
    then = f"import glob; subprocess.run(['chattr', '+i', *{new}], check=True)"
    try:
        failed = run_hooked(
            "sketchsweep.data.subset", f"event == 'os.rename' and path(args[0]) == {str(dst)!r}", then,
            src, dst, "--per-class", 7, "--classes", "bee", "--force",
        )  # fmt: skip
    finally:
        subprocess.run(["chattr", "-i", *tmp_path.glob(".sub-*")], check=False)
    assert dst.is_dir() and folder_bytes(dst) == before, failed.stderr
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and str(dst) in failed.stderr, failed.stderr
    assert not list(tmp_path.glob(".sub-old-*"))


def test_signals_as_the_forced_subset_is_swapped_in_wait_for_the_swap(src, tmp_path):
    """Ctrl-C twice (the second means "stop now") just as the new subset replaces the old one: the signals
    wait for both renames, so the user has the new subset, never neither."""
    dst = make_subset(src, tmp_path / "sub", 5, ["ant"])
    twice = "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)"
    done = run_hooked(
        "sketchsweep.data.subset", f"event == 'os.rename' and path(args[1]) == {str(dst)!r}", twice,
        src, dst, "--per-class", 7, "--classes", "bee", "--force",
    )  # fmt: skip
    assert dst.is_dir(), done.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["bee.npy", "manifest.json"], done.stderr
    np.testing.assert_array_equal(np.load(dst / "bee.npy"), np.load(src / "bee.npy")[:7])
    assert done.returncode == 0 and "signal 2" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "sub"]
