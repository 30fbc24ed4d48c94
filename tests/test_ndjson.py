"""Simplified ndjson -> numpy_bitmap conversion, and the rasterizer against Google's real bitmaps."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sketchsweep.config import PROJECT_ROOT
from sketchsweep.data import DataError, load_folder
from sketchsweep.data.folder import read_class_file
from sketchsweep.data.ndjson2npy import convert, read_ndjson
from sketchsweep.data.raster import rasterize
from tests.conftest import SHARED_QUICKDRAW, cli_env

MONKEY = SHARED_QUICKDRAW.parent / "ndjson" / "monkey.ndjson"
SQUARE = [[[10, 200, 200, 10, 10], [10, 10, 200, 200, 10]]]
LINE = [[[0, 255], [128, 128]]]

# One line per skip reason, with the reason read_ndjson must give it.
INVALID = {
    "invalid JSON": '{"word": "cat", "drawing": [[[1, 2], [3, 4]]',
    "not a JSON object": "[1, 2, 3]",
    "missing drawing": json.dumps({"word": "cat"}),
    "ill-typed drawing": json.dumps({"word": "cat", "drawing": {"xs": [1]}}),
    "stroke xs/ys lengths differ": json.dumps({"word": "cat", "drawing": [[[1, 2, 3], [4, 5]]]}),
    "non-numeric coordinates": json.dumps({"word": "cat", "drawing": [[[1, "2"], [4, 5]]]}),
    "empty drawing": json.dumps({"word": "cat", "drawing": []}),
    "coordinates outside 0-255": json.dumps({"word": "cat", "drawing": [[[1, 900], [4, 5]]]}),
    "missing or ill-typed word": json.dumps({"word": "../evil", "drawing": SQUARE}),
}


def record(word, drawing, recognized=True):
    return json.dumps({"word": word, "countrycode": "US", "recognized": recognized, "drawing": drawing})


@pytest.fixture
def ndjson(tmp_path):
    lines = [record("cat", SQUARE), record("cat", LINE, recognized=False), record("traffic light", LINE)]
    lines += [record("cat", SQUARE), *INVALID.values(), json.dumps({"word": "cat", "drawing": [[[1], []]]})]
    path = tmp_path / "mixed.ndjson"
    path.write_text("\n".join(lines) + "\n\n")  # a blank line is not a drawing
    return path


def test_read_ndjson_counts_each_skip_reason(ndjson):
    by_word, skipped = read_ndjson(ndjson)
    assert {w: len(d) for w, d in by_word.items()} == {"cat": 3, "traffic light": 1}
    assert skipped == {**dict.fromkeys(INVALID, 1), "stroke xs/ys lengths differ": 2}
    assert by_word["cat"][0][0].shape == (5, 2)


def test_convert_writes_one_file_per_word(ndjson, tmp_path):
    out = convert(ndjson, tmp_path / "out")
    assert set(out) == {"cat", "traffic light"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cat.npy", "traffic light.npy"]  # no temp files
    cat = np.load(out["cat"], allow_pickle=False)
    assert cat.dtype == np.uint8 and cat.shape == (3, 784)
    np.testing.assert_array_equal(cat[0], rasterize([[np.array(SQUARE[0]).T]])[0])
    np.testing.assert_array_equal(cat[0], cat[2])
    ds = load_folder(tmp_path / "out")  # the loader accepts what we wrote
    assert ds.class_names == ["cat", "traffic light"] and ds.images.shape == (4, 784)


def test_recognized_only_filters(ndjson, tmp_path):
    by_word, skipped = read_ndjson(ndjson, recognized_only=True)
    assert len(by_word["cat"]) == 2 and skipped["not recognized (--recognized-only)"] == 1
    out = convert(ndjson, tmp_path / "out", recognized_only=True)
    assert np.load(out["cat"]).shape == (2, 784)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sketchsweep.data.ndjson2npy", *map(str, args)],
        cwd=PROJECT_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prints_summary_and_fails_when_nothing_is_valid(ndjson, tmp_path):
    ok = run_cli(ndjson, tmp_path / "out", "--recognized-only")
    assert ok.returncode == 0, ok.stderr
    assert "written 3, skipped 11" in ok.stdout
    assert "skipped 2: stroke xs/ys lengths differ" in ok.stdout and "skipped 1: invalid JSON" in ok.stdout
    assert np.load(tmp_path / "out" / "traffic light.npy").shape == (1, 784)

    bad = tmp_path / "bad.ndjson"
    bad.write_text("\n".join(INVALID.values()) + "\n")
    failed = run_cli(bad, tmp_path / "none")
    assert failed.returncode == 2
    assert str(bad) in failed.stderr and "no valid drawing" in failed.stderr and "1 invalid JSON" in failed.stderr
    assert not (tmp_path / "none").exists()
    assert run_cli(tmp_path / "missing.ndjson", tmp_path / "none").returncode == 2
    with pytest.raises(DataError, match="cannot be read"):
        read_ndjson(tmp_path / "missing.ndjson")


def pooled_stats(images):
    """Mean intensity, ink fraction, stroke width and margin, as benchmarks/raster_stats.py measures them."""
    imgs = images.reshape(-1, 28, 28)
    mask = np.pad(imgs > 127, ((0, 0), (1, 1), (1, 1)))
    crossings = (mask[:, 1:] != mask[:, :-1]).sum((1, 2)) + (mask[:, :, 1:] != mask[:, :, :-1]).sum((1, 2))
    width = (imgs.sum((1, 2)) / 255.0) / (np.pi / 8.0 * np.maximum(crossings, 1))
    ink = imgs > 0
    rows, cols = ink.any(2), ink.any(1)
    margin = np.minimum.reduce([rows.argmax(1), cols.argmax(1), rows[:, ::-1].argmax(1), cols[:, ::-1].argmax(1)])
    return {"mean": imgs.mean(), "ink": ink.mean(), "width": width.mean(), "margin": margin.mean()}


@pytest.mark.skipif(not (MONKEY.is_file() and SHARED_QUICKDRAW.is_dir()), reason="real data not in ../shared/data")
def test_rendered_real_drawings_look_like_googles_bitmaps():
    by_word, skipped = read_ndjson(MONKEY)
    assert len(by_word["monkey"]) == 1000 and not skipped
    got = pooled_stats(rasterize(by_word["monkey"][:300]))
    real = pooled_stats(np.concatenate([read_class_file(p, 300) for p in sorted(SHARED_QUICKDRAW.glob("*.npy"))]))
    # Measured (benchmarks/RASTER.md): rendered/real = 1.25 mean, 1.21 ink fraction, 1.04 width; margin 1.0 vs 0.85.
    # Monkeys draw more than the average class, hence mean/ink above 1. A line twice as wide gives 2.0, 1.5, 2.4;
    # no padding gives 1.6, 1.45 and margin 0.
    assert 0.65 < got["mean"] / real["mean"] < 1.35
    assert 0.65 < got["ink"] / real["ink"] < 1.35
    assert 0.8 < got["width"] / real["width"] < 1.25
    assert got["margin"] >= 1.0 and real["margin"] > 0.5
