"""Streaming input throughput and peak memory on a dataset several times the memory budget.

    python benchmarks/bench_stream.py                  # 345 classes x 30,000 rows = 8.1 GB in /tmp
    python benchmarks/bench_stream.py --rows 2000      # a quick 0.5 GB check
    python benchmarks/bench_stream.py --order exact    # data.stream_order=exact (the resident order)

Writes a numpy_bitmap folder (uint8 (N, 784) per class) once, then streams one full shuffled
epoch of the training split through ``StreamingSplit`` (the path training takes when data
exceeds ``data.max_memory_gb``), timing the batches delivered as uint8 and as normalized
float model input. Reports images/s and the process's peak resident memory. Needs only torch
and numpy. Prints a table and saves JSON to benchmarks/results/bench_stream.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sketchsweep.data.folder import class_labels, select_files, stratified_split
from sketchsweep.data.stream import RowReader
from sketchsweep.data.views import StreamingSplit
from sketchsweep.engine import to_input


def write_dataset(root: Path, classes: int, rows: int) -> None:
    """Class files of distinct-looking rows; reused if already complete."""
    root.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 256, size=(rows, 784), dtype=np.uint8)
    for c in range(classes):
        path = root / f"class{c:03d}.npy"
        if path.exists() and path.stat().st_size == 128 + rows * 784:
            continue
        np.save(root / f"class{c:03d}.tmp.npy", base ^ np.uint8(c % 256))
        os.replace(root / f"class{c:03d}.tmp.npy", path)


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    current = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drop_page_cache() -> bool:
    """Cold reads when allowed (root on a real machine); containers usually refuse."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/sketchsweep-stream-bench")
    ap.add_argument("--classes", type=int, default=345)
    ap.add_argument("--rows", type=int, default=30000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--budget-gb", type=float, default=1.0, help="the memory budget the data exceeds")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--order", choices=("exact", "chunks"), default="chunks", help="data.stream_order")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.dir)

    t0 = time.perf_counter()
    write_dataset(root, args.classes, args.rows)
    write_s = time.perf_counter() - t0
    files = select_files(root)
    reader = RowReader(list(files.values()))
    assert reader.nbytes > args.budget_gb * 1e9, "dataset must exceed the budget to be streamed"
    labels = class_labels(reader.counts)
    train_idx, _, _ = stratified_split(labels, list(files), 0.1, seed=0)
    split = StreamingSplit(reader, labels, train_idx, torch.device("cpu"), order=args.order)
    cold = drop_page_cache()
    print(
        f"dataset: {reader.nbytes / 1e9:.2f} GB, {len(reader):,} images in {len(files)} files; "
        f"train split {len(split):,}; written in {write_s:.0f}s; page cache dropped: {cold}",
        flush=True,
    )

    results = []
    for mode in ("uint8 batches", "float model input"):
        n, start = 0, time.perf_counter()
        for x, _ in split.batches(args.batch_size, torch.Generator().manual_seed(len(results))):
            if mode == "float model input":
                x = to_input(x)
            n += len(x)
        seconds = time.perf_counter() - start
        current, peak = rss_mb()
        results.append(
            {
                "mode": mode,
                "images": n,
                "seconds": seconds,
                "images_per_sec": n / seconds,
                "rss_mb": current,
                "peak_rss_mb": peak,
            }
        )
        print(f"  {mode}: {n:,} images in {seconds:.1f}s", flush=True)

    print("\n| mode | images | seconds | images/s | RSS MB | peak RSS MB |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mode']} | {r['images']:,} | {r['seconds']:.1f} | {r['images_per_sec']:,.0f} | "
            f"{r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    out = Path(__file__).resolve().parent / "results" / "bench_stream.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "dataset_gb": reader.nbytes / 1e9,
        "budget_gb": args.budget_gb,
        "order": args.order,
        "batch_size": args.batch_size,
        "page_cache_dropped": cold,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nsaved {out}")
    reader.close()
    if not args.keep:
        for p in root.glob("*.npy"):
            p.unlink()
        root.rmdir()


if __name__ == "__main__":
    main()
