"""Compare the rasterizer with Google's numpy_bitmap files by image statistics.

There are no pixel-matched pairs (the ndjson drawings have no bitmap counterpart), so we render
``ndjson/monkey.ndjson`` and compare per-image statistics with the real bitmaps of the 24 classes,
pooled and per class.

    .venv/bin/python benchmarks/raster_stats.py [--data ../shared/data]

Statistics (means over images):
- ``mean``: mean intensity of all 784 pixels (0-255);
- ``ink``: fraction of pixels > 0;
- ``sat``: fraction of pixels == 255;
- ``width``: stroke width in px = ink mass (sum / 255) divided by stroke length. The length is half
  the perimeter of the ``> 127`` mask, and the perimeter is estimated from the number of 0/ink
  transitions along rows and columns times pi/4 (Cauchy-Crofton: a segment of length L at a random
  angle has on average 4L/pi row+column crossings). A long stroke of width w and length L has
  mass w*L and perimeter ~2L, so this gives w whatever the stroke's direction;
- ``margin``: min distance in px from the bounding box of pixels > 0 to the image edge;
- ``ink_value`` and ``sat_share``: mean value of the ink pixels, and the share of them that are 255
  (pooled over all ink pixels). Unlike ``mean`` and ``ink``, these hardly depend on how much a class
  draws (a monkey has more stroke length than a circle), so they isolate the coverage ramp.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sketchsweep.data.folder import list_class_files, read_class_file  # noqa: E402
from sketchsweep.data.ndjson2npy import read_ndjson  # noqa: E402
from sketchsweep.data.raster import rasterize  # noqa: E402

STATS = ("mean", "ink", "sat", "width", "margin", "ink_value", "sat_share")


def image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics of ``uint8 (N, 784)`` bitmaps (see the module docstring)."""
    imgs = images.reshape(-1, 28, 28)
    mask = imgs > 127
    # Pad with background so a stroke touching the edge still closes its perimeter.
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    crossings = (padded[:, 1:, :] != padded[:, :-1, :]).sum((1, 2)) + (padded[:, :, 1:] != padded[:, :, :-1]).sum(
        (1, 2)
    )
    length = np.pi / 8.0 * crossings  # half the Crofton perimeter
    mass = imgs.sum((1, 2), dtype=np.float64) / 255.0
    ink = imgs > 0
    rows, cols = ink.any(2), ink.any(1)
    first = lambda a: np.argmax(a, axis=1)  # noqa: E731
    last = lambda a: a.shape[1] - 1 - np.argmax(a[:, ::-1], axis=1)  # noqa: E731
    margin = np.minimum.reduce([first(rows), first(cols), 27 - last(rows), 27 - last(cols)]).astype(np.float64)
    has_ink = rows.any(1)
    return {
        "mean": imgs.mean((1, 2)),
        "ink": ink.mean((1, 2)),
        "sat": (imgs == 255).mean((1, 2)),
        "width": np.where(length > 0, mass / np.maximum(length, 1e-9), np.nan),
        "margin": np.where(has_ink, margin, np.nan),
    }


def summarize(images: np.ndarray) -> dict[str, float]:
    """Mean of each per-image statistic (images without ink are left out of width and margin)."""
    ink = images[images > 0]
    return {
        **{k: float(np.nanmean(v)) for k, v in image_stats(images).items()},
        "ink_value": float(ink.mean()),
        "sat_share": float((ink == 255).mean()),
    }


def collect(data: Path) -> dict:
    by_word, skipped = read_ndjson(data / "ndjson" / "monkey.ndjson")
    t0 = time.perf_counter()
    rendered = rasterize(by_word["monkey"])
    seconds = time.perf_counter() - t0
    real = {name: read_class_file(path) for name, path in list_class_files(data / "quickdraw").items()}
    per_class = {name: summarize(arr) for name, arr in real.items()}
    return {
        "rendered": {"source": "ndjson/monkey.ndjson", "n": len(rendered), **summarize(rendered)},
        "real_pooled": {
            "source": "quickdraw/*.npy",
            "n": sum(map(len, real.values())),
            **summarize(np.concatenate(list(real.values()))),
        },
        "real_per_class": per_class,
        "real_class_range": {
            k: [min(s[k] for s in per_class.values()), max(s[k] for s in per_class.values())] for k in STATS
        },
        "skipped": dict(skipped),
        "render_seconds": seconds,
    }


def table(res: dict) -> str:
    cols = ("mean", "ink", "sat", "width px", "margin px", "ink value", "255 share")
    fmt = ("{:.1f}", "{:.3f}", "{:.3f}", "{:.2f}", "{:.2f}", "{:.0f}", "{:.3f}")
    lines = ["| images | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]

    def row(name, n, values):
        return f"| {name} | {n} | " + " | ".join(values) + " |"

    for key, name in (("rendered", "rendered monkey.ndjson"), ("real_pooled", "real, 24 classes pooled")):
        s = res[key]
        lines.append(row(name, s["n"], [f.format(s[k]) for f, k in zip(fmt, STATS, strict=True)]))
    rng = res["real_class_range"]
    lines.append(
        row(
            "real, per-class min-max",
            "",
            [f"{f.format(rng[k][0])}-{f.format(rng[k][1])}" for f, k in zip(fmt, STATS, strict=True)],
        )
    )
    lines.append(
        row("rendered / real pooled", "", [f"{res['rendered'][k] / res['real_pooled'][k]:.2f}" for k in STATS])
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="shared data folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "raster_stats.json")
    args = parser.parse_args()
    res = collect(args.data)
    print(table(res))
    print("\nper class (real):")
    for name, s in res["real_per_class"].items():
        print(f"  {name:<14} " + " ".join(f"{k}={s[k]:.3f}" for k in STATS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
