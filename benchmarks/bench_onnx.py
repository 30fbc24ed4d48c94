"""ONNX Runtime against PyTorch eager on the CPU: batch-1 latency and batch-256 throughput.

    python benchmarks/bench_onnx.py                       # widths 32 and 64, 345 classes, ~1-2 min on 2 cores
    python benchmarks/bench_onnx.py --widths 16 --iters 100 --reps 3

Both run the same thing: uint8 (N, 28, 28) drawings in, logits and softmax out (PyTorch converts
and normalizes with training's ``to_input``; the ONNX graph does it inside). The models are
random-init SketchCNNs (hidden 256) with 345 classes, Quick, Draw!'s full set: speed does not
depend on the weights. Each is exported with ``sketchsweep.onnx_export.export_onnx`` (so parity is
checked too) and run on synthetic drawings. PyTorch runs under ``torch.inference_mode``; both use
their default thread counts. Latency: p50/p99 of 300 single-drawing calls; throughput: the median
of 10 calls on 256 drawings; the two runtimes are timed in alternating rounds, so load from other
processes falls on both alike. Prints a table and saves JSON to benchmarks/results/bench_onnx.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.checkpoint import TrainedModel  # noqa: E402
from sketchsweep.data.synthetic import SHAPES, draw_class  # noqa: E402
from sketchsweep.engine import to_input  # noqa: E402
from sketchsweep.model import SketchCNN  # noqa: E402
from sketchsweep.onnx_export import export_onnx  # noqa: E402


def drawings(n: int) -> np.ndarray:
    per = -(-n // len(SHAPES))
    return np.concatenate([draw_class(s, per, seed=3) for s in SHAPES])[:n].reshape(n, 28, 28)


def measure(fns: dict, x: np.ndarray, iters: int, reps: int, rounds: int = 5) -> dict:
    """Batch-1 call times (ms) and full-batch images/s for each runtime, taken in alternating
    rounds so that load from other processes falls on both alike."""
    one = [x[i % len(x) : i % len(x) + 1] for i in range(iters)]
    for fn in fns.values():  # warm-up
        for b in one[:20]:
            fn(b)
        fn(x)
    lat: dict = {k: [] for k in fns}
    full: dict = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            for b in one[r::rounds]:
                t = time.perf_counter()
                fn(b)
                lat[k].append((time.perf_counter() - t) * 1e3)
            for _ in range(-(-reps // rounds)):
                t = time.perf_counter()
                fn(x)
                full[k].append(time.perf_counter() - t)
    return {
        k: {
            "batch1_p50_ms": round(float(np.percentile(lat[k], 50)), 3),
            "batch1_p99_ms": round(float(np.percentile(lat[k], 99)), 3),
            "images_per_s": round(len(x) / statistics.median(full[k])),
        }
        for k in fns
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="32,64")
    parser.add_argument("--classes", type=int, default=345)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=300, help="timed batch-1 calls")
    parser.add_argument("--reps", type=int, default=10, help="timed full-batch calls")
    args = parser.parse_args()

    x = drawings(args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in map(int, args.widths.split(",")):
            torch.manual_seed(0)
            model = SketchCNN(args.classes, width=width).eval()
            names = [f"class{i}" for i in range(args.classes)]
            report = export_onnx(
                TrainedModel(model, names, source="bench"), Path(tmp) / f"w{width}.onnx", real_images=x
            )
            session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])

            def run_ort(batch, session=session):
                return session.run(None, {"images": batch})

            def run_torch(batch, model=model):
                with torch.inference_mode():
                    logits = model(to_input(torch.from_numpy(batch)))
                    return logits, torch.softmax(logits, dim=1)

            results = measure({"PyTorch eager": run_torch, "ONNX Runtime": run_ort}, x, args.iters, args.reps)
            for runtime, r in results.items():
                rows.append({"width": width, "runtime": runtime, **r})
                print(rows[-1], flush=True)
            rows[-1].update(
                onnx_mb=round(report.path.stat().st_size / 1e6, 2),
                export_s=round(report.seconds, 1),
                max_abs_diff=report.max_abs_diff,
            )

    print(f"\n{'width':>5}  {'runtime':<14} {'b1 p50 ms':>9} {'b1 p99 ms':>9} {f'b{args.batch} img/s':>11}")
    for r in rows:
        print(
            f"{r['width']:>5}  {r['runtime']:<14} {r['batch1_p50_ms']:>9.2f} {r['batch1_p99_ms']:>9.2f} "
            f"{r['images_per_s']:>11,}"
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "torch_threads": torch.get_num_threads(),
        "classes": args.classes,
        "batch": args.batch,
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / "bench_onnx.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
