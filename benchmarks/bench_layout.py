"""Training speed of memory layout and precision on this machine: a SketchCNN step (forward,
backward, Adam) through the engine's own ``train_one_epoch``, contiguous vs channels-last weights
and inputs, fp32 vs bf16 autocast. What set ``MixedPrecision.channels_last`` on for every device
and what ``trainer.precision=bf16`` buys on a CPU with native bf16.

    python benchmarks/bench_layout.py                              # widths 8, 32, 64 at batch 128
    python benchmarks/bench_layout.py --widths 32,48 --batch-size 128 --steps 40

Prints a table and saves JSON to benchmarks/results/bench_layout.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.data.views import Split  # noqa: E402
from sketchsweep.engine import MixedPrecision, native_bf16, prepare_model, train_one_epoch  # noqa: E402
from sketchsweep.model import SketchCNN, count_parameters  # noqa: E402

VARIANTS = {  # name: (autocast dtype, channels-last)
    "fp32 contiguous": (None, False),
    "fp32 channels-last": (None, True),
    "bf16 contiguous": (torch.bfloat16, False),
    "bf16 channels-last": (torch.bfloat16, True),
}


def time_step(width: int, batch: int, steps: int, dtype, channels_last: bool, device: torch.device) -> float:
    """Milliseconds per training step of ``steps`` steps, after three warm-up steps."""
    torch.manual_seed(0)
    precision = MixedPrecision(dtype, channels_last=channels_last)
    model = prepare_model(SketchCNN(24, width=width), device, precision)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images = torch.randint(0, 256, (batch * steps, 784), dtype=torch.uint8, device=device)
    data = Split(images, torch.randint(0, 24, (len(images),), device=device))
    gen = torch.Generator().manual_seed(0)
    warm = Split(data.images, data.labels, torch.arange(3 * batch, device=device))
    train_one_epoch(model, warm, opt, batch, gen, precision=precision)
    start = time.perf_counter()
    train_one_epoch(model, data, opt, batch, gen, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", default="8,32,64")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_layout.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    rows = []
    for width in [int(w) for w in a.widths.split(",")]:
        base = None
        for name, (dtype, channels_last) in VARIANTS.items():
            ms = time_step(width, a.batch_size, a.steps, dtype, channels_last, device)
            base = base or ms
            rows.append(
                {
                    "width": width,
                    "params": count_parameters(SketchCNN(24, width=width)),
                    "variant": name,
                    "ms_per_step": round(ms, 1),
                    "speedup": round(base / ms, 2),
                }
            )
            print(f"width {width} {name}: {ms:.1f} ms/step ({base / ms:.2f}x)", flush=True)
    print(
        f"\n{device.type}, batch {a.batch_size}, native bf16: {native_bf16(device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n\n| width | params | variant | ms/step | vs fp32 contiguous |\n|"
        + " --- |"
        * 5
    )
    for r in rows:
        print(f"| {r['width']} | {r['params']:,} | {r['variant']} | {r['ms_per_step']} | {r['speedup']:.2f}x |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": native_bf16(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": a.batch_size,
    }
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
