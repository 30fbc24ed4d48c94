"""sketchsweep's engine against a faithful reimplementation of the seed's training loop.

    python benchmarks/bench_train.py                        # CPU: widths 16 and 64, 10 synthetic classes
    python benchmarks/bench_train.py --classes 345 --per-class 1000 --widths 64,128 --batch-size 1024  # GPU

(a) the seed: a per-sample ``Dataset`` (``__getitem__`` converts one row and normalizes it)
behind ``DataLoader(batch_size=256, shuffle=True)``, fp32; (b) the engine with its defaults for
the device (data resident on the device, batches gathered by index, bf16 autocast on CUDA).
Same model, data and number of images; each warmed up, then timed. Also times the input path
alone (batches delivered, no model). Needs only torch and numpy. Prints a table and saves JSON to
benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.data.synthetic import SHAPES, draw_class  # noqa: E402
from sketchsweep.engine import Split, evaluate, resolve_precision, to_input, train_one_epoch  # noqa: E402
from sketchsweep.model import SketchCNN  # noqa: E402


class SeedDataset(torch.utils.data.Dataset):
    """The seed's dataset: one row at a time, ToTensor (/255) then Normalize(0.5, 0.5) per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i].reshape(1, 28, 28).astype(np.float32) / 255.0)
        return (x - 0.5) / 0.5, int(self.labels[i])


def seed_epoch(model, loader, optimizer, device, max_batches: int | None = None) -> int:
    """The seed's training loop: fp32, a .to(device) per batch. Returns images seen."""
    model.train()
    seen = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen


def make_data(classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic sketches; beyond the 10 shapes, classes reuse shapes with other seeds."""
    names = list(SHAPES)
    images = [draw_class(names[c % len(names)], per_class, seed=c // len(names)) for c in range(classes)]
    return np.concatenate(images), np.repeat(np.arange(classes), per_class)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(args) -> list[dict]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = make_data(args.classes, args.per_class)
    n = len(labels)
    results = []
    for width in [int(w) for w in args.widths.split(",")]:
        for variant in ("seed", "engine"):
            torch.manual_seed(0)
            model = SketchCNN(args.classes, width=width).to(device)
            precision = resolve_precision("fp32" if variant == "seed" else "auto", device)
            if variant == "engine" and device.type == "cuda":
                torch.backends.cudnn.benchmark = True
                model = model.to(memory_format=torch.channels_last)
            fused = {"fused": True} if variant == "engine" and device.type == "cuda" else {}
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, **fused)
            batch = 256 if variant == "seed" else args.batch_size
            steps = max(1, args.images // batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if variant == "seed":
                loader = torch.utils.data.DataLoader(SeedDataset(images, labels), batch_size=256, shuffle=True)
                seed_epoch(model, loader, opt, device, max_batches=3)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                seen = seed_epoch(model, loader, opt, device, max_batches=steps)
                sync(device)
                train_s = time.perf_counter() - t0
                # The seed's input path alone: iterate the DataLoader, no model.
                t0 = time.perf_counter()
                for i, _ in enumerate(loader):
                    if i >= steps:
                        break
                input_s = time.perf_counter() - t0
            else:
                split = Split(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device))
                sub = Split(split.images, split.labels, torch.arange(min(n, steps * batch), device=device))
                gen = torch.Generator().manual_seed(0)
                warm = Split(split.images, split.labels, torch.arange(3 * batch, device=device))
                train_one_epoch(model, warm, opt, batch, gen, precision=precision)
                sync(device)
                t0 = time.perf_counter()
                stats = train_one_epoch(model, sub, opt, batch, gen, precision=precision)
                sync(device)
                train_s, seen = time.perf_counter() - t0, round(stats["train_images_per_sec"] * stats["epoch_seconds"])
                t0 = time.perf_counter()
                for x, _ in sub.batches(batch, gen):
                    to_input(x, precision.channels_last)
                sync(device)
                input_s = time.perf_counter() - t0
            ev = Split(
                torch.from_numpy(images[: args.eval_images]).to(device),
                torch.from_numpy(labels[: args.eval_images]).to(device),
            )
            evaluate(model, ev, 1024, precision=precision)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            evaluate(model, ev, 1024 if variant == "engine" else 256, precision=precision)
            sync(device)
            eval_s = time.perf_counter() - t0
            row = {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "width": width,
                "variant": variant,
                "batch": batch,
                "precision": str(precision.dtype or torch.float32).replace("torch.", ""),
                "train_images_per_sec": seen / train_s,
                "input_images_per_sec": (steps * batch) / input_s,
                "input_share_of_step": input_s / train_s,
                "eval_images_per_sec": len(ev) / eval_s,
                "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            }
            results.append(row)
            print(f"  width {width} {variant}: {row['train_images_per_sec']:,.0f} train img/s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--widths", default="16,64")
    ap.add_argument("--batch-size", type=int, default=256, help="the engine's batch (the seed's is 256)")
    ap.add_argument("--images", type=int, default=2560, help="images per timed training run")
    ap.add_argument("--eval-images", type=int, default=2048)
    args = ap.parse_args()
    results = bench(args)
    print("\n| width | loop | precision | batch | train img/s | input img/s | input share of train time | eval img/s |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['width']} | {r['variant']} | {r['precision']} | {r['batch']} | {r['train_images_per_sec']:,.0f} | "
            f"{r['input_images_per_sec']:,.0f} | {r['input_share_of_step']:.1%} | {r['eval_images_per_sec']:,.0f} |"
        )
    out = ROOT / "benchmarks" / "results" / "bench_train.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta | vars(args), "results": results}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
