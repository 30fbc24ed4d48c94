"""sketchsweep's engine against a faithful reimplementation of the seed's training loop.

    python benchmarks/bench_train.py                        # CPU: widths 16 and 64, 10 synthetic classes
    python benchmarks/bench_train.py --classes 345 --per-class 1000 --widths 64,128 --batch-size 1024  # GPU
    python benchmarks/bench_train.py --accuracy             # seed loop vs engine: validation accuracy
    python benchmarks/bench_train.py --recipe DIR           # the seed recipe end to end on a folder
    bash benchmarks/gpu.sh                                  # all of the GPU half, with the CUDA tests

(a) the seed: a per-sample ``Dataset`` (``__getitem__`` converts one row and normalizes it)
behind ``DataLoader(batch_size=256, shuffle=True)``, fp32; (b) the engine with its defaults for
the device (data resident on the device, batches gathered by index, bf16 autocast on CUDA).
Same model, data and number of images; each warmed up, then timed. Also times the input path
alone (batches delivered, no model), counts a training step's FLOPs with
``torch.utils.flop_counter`` and compares the achieved rate with the device's measured matmul
peak (bf16 on CUDA, fp32 on a CPU). ``--compile`` adds the engine under torch.compile (what sets
``trainer.compile``'s default); ``--profile`` prints a torch.profiler table of the top kernels.
``--accuracy`` checks the results contract (same validation accuracy as the seed's loop, within
the seed-to-seed spread); ``--recipe`` times 20 epochs of the seed recipe from the first read of
the folder to the last evaluation, through the core alone. Needs only torch and numpy. Prints a
table and saves JSON to benchmarks/results/bench_train{,_accuracy,_recipe}.json (``--out-dir``).
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
from sketchsweep.data import load_folder, stratified_split  # noqa: E402
from sketchsweep.data.synthetic import SHAPES, draw_class  # noqa: E402
from sketchsweep.data.views import Split  # noqa: E402
from sketchsweep.engine import (  # noqa: E402
    evaluate,
    optimizer_options,
    prepare_model,
    resolve_precision,
    to_input,
    train_one_epoch,
)
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


UNIQUE = 200  # drawings rendered per class; more are repeats (drawing takes ~2 ms each, speed is what is measured)


def make_data(classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic sketches; beyond the 10 shapes, classes reuse shapes with other seeds. At most
    ``UNIQUE`` distinct drawings per class, repeated up to ``per_class`` (345 x 10k would take
    two hours to render, and throughput does not depend on the pixels)."""
    names = list(SHAPES)
    n = min(per_class, UNIQUE)
    images = [
        np.resize(draw_class(names[c % len(names)], n, seed=c // len(names)), (per_class, 784)) for c in range(classes)
    ]
    return np.concatenate(images), np.repeat(np.arange(classes), per_class)


def write_folder(root: Path, classes: int, per_class: int) -> None:
    """The benchmark's data as one ``class<k>.npy`` per class, for ``data=quickdraw data.root=...``."""
    images, _ = make_data(classes, per_class)
    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        np.save(root / f"class{c:03d}.npy", images[c * per_class : (c + 1) * per_class])
    print(f"wrote {classes} classes x {per_class} drawings to {root}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_image(model: torch.nn.Module, classes: int, batch: int = 16) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by
    ``torch.utils.flop_counter`` on a CPU copy (the count does not depend on the device)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = SketchCNN(classes, width=model.features[0][0].out_channels)
    x, y = torch.zeros(batch, 1, 28, 28), torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return counter.get_total_flops() / batch


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's measured dense matmul throughput in ``dtype``: the ceiling to compare with."""
    n, iters = (8192, 50) if device.type == "cuda" else (1024, 10)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def profile_steps(model, split: Split, opt, batch: int, precision, device: torch.device, out: Path) -> str:
    """``torch.profiler`` table of the top kernels over a few training steps (what limits a run)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sub = Split(split.images, split.labels, torch.arange(min(len(split), 10 * batch), device=device))
    with profile(activities=activities) as prof:
        train_one_epoch(model, sub, opt, batch, torch.Generator().manual_seed(1), precision=precision)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    out.write_text(table + "\n")
    return table


def make_run(classes: int, width: int, loop: str, device: torch.device):
    """Model, Adam (lr 1e-3, wd 1e-4) and precision for ``loop``: "seed" as the seed ran (fp32,
    plain Adam, cuDNN's default kernel choice); otherwise the engine's defaults for ``device``,
    set up by the same functions ``sketchsweep.train`` uses."""
    if loop == "seed":
        torch.backends.cudnn.benchmark = False  # an earlier engine run in this process turned it on
        model = SketchCNN(classes, width=width).to(device)
        return (
            model,
            torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4),
            resolve_precision("fp32", device),
        )
    precision = resolve_precision("auto", device)
    model = prepare_model(SketchCNN(classes, width=width), device, precision)
    options = optimizer_options("torch.optim.Adam", device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, **options), precision


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def dtype_name(dtype: torch.dtype | None) -> str:
    """A precision's dtype as the table prints it (None: fp32, as ``MixedPrecision`` means it)."""
    return str(dtype or torch.float32).replace("torch.", "")


def resident_splits(images: np.ndarray, labels: np.ndarray, train_idx, val_idx, device: torch.device):
    """Train and validation ``Split``s over one copy of the data on ``device``, as training builds them."""
    on_device = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    return tuple(Split(*on_device, torch.from_numpy(idx).to(device)) for idx in (train_idx, val_idx))


def pick_device(name: str) -> torch.device:
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def bench(args) -> list[dict]:
    device = pick_device(args.device)
    images, labels = make_data(args.classes, args.per_class)
    n = len(labels)
    auto = resolve_precision("auto", device)
    peak_dtype = auto.dtype or torch.float32
    peak = matmul_peak_tflops(device, peak_dtype)
    print(f"measured {str(peak_dtype).replace('torch.', '')} matmul peak: {peak:.2f} TFLOP/s", flush=True)
    variants = ("seed", "engine", "engine+compile") if args.compile else ("seed", "engine")
    results = []
    for width in [int(w) for w in args.widths.split(",")]:
        for variant in variants:
            torch.manual_seed(0)
            warmup_s = None
            model, opt, precision = make_run(args.classes, width, variant, device)
            flops = train_flops_per_image(model, args.classes)
            net = torch.compile(model) if variant == "engine+compile" else model
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
                t0 = time.perf_counter()
                train_one_epoch(net, warm, opt, batch, gen, precision=precision)  # compiles, if compiled
                sync(device)
                warmup_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                stats = train_one_epoch(net, sub, opt, batch, gen, precision=precision)
                sync(device)
                train_s, seen = time.perf_counter() - t0, round(stats["train_images_per_sec"] * stats["epoch_seconds"])
                t0 = time.perf_counter()
                for x, _ in sub.batches(batch, gen):
                    to_input(x, precision.channels_last)
                sync(device)
                input_s = time.perf_counter() - t0
                if args.profile:
                    name = f"profile_{device.type}_w{width}_{variant}.txt"
                    print(profile_steps(net, split, opt, batch, precision, device, Path(args.out_dir) / name))
            ev = Split(
                torch.from_numpy(images[: args.eval_images]).to(device),
                torch.from_numpy(labels[: args.eval_images]).to(device),
            )
            evaluate(net, ev, 1024, precision=precision)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            evaluate(net, ev, 256 if variant == "seed" else 1024, precision=precision)
            sync(device)
            eval_s = time.perf_counter() - t0
            row = {
                "device": device_name(device),
                "width": width,
                "variant": variant,
                "batch": batch,
                "precision": dtype_name(precision.dtype),
                "train_images_per_sec": seen / train_s,
                "input_images_per_sec": (steps * batch) / input_s,
                "input_share_of_step": input_s / train_s,
                "eval_images_per_sec": len(ev) / eval_s,
                "train_flops_per_image": flops,
                "achieved_tflops": seen / train_s * flops / 1e12,
                "peak_tflops": peak,
                "peak_dtype": dtype_name(peak_dtype),
                "warmup_seconds": warmup_s,
                "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            }
            results.append(row)
            print(f"  width {width} {variant}: {row['train_images_per_sec']:,.0f} train img/s", flush=True)
    return results


def accuracy_data(args) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A numpy_bitmap folder (``--data``), or the 10 synthetic shapes with distinct drawings
    (not ``make_data``'s repeats, which would put copies of training images in the validation split)."""
    if args.data:
        ds = load_folder(args.data, max_per_class=args.accuracy_per_class)
        return ds.images, ds.labels, ds.class_names
    names = list(SHAPES)
    images = np.concatenate([draw_class(name, args.accuracy_per_class, seed=0) for name in names])
    return images, np.repeat(np.arange(len(names)), args.accuracy_per_class), names


def accuracy_check(args) -> dict:
    """The results contract: the seed's loop (fp32, per-sample Dataset + DataLoader) and the engine
    (its defaults for the device: bf16, channels-last and fused Adam on CUDA) train the same model
    from the same initial weights on the same 90/10 split with the seed recipe (Adam 1e-3, wd 1e-4,
    StepLR(10, 0.5), batch 256) for ``--epochs``; each is scored on the validation split, for
    several seeds. The engine matches when the gap between the two loops' mean accuracy is within
    the spread that changing the seed alone gives."""
    device = pick_device(args.device)
    epochs = args.epochs or 4
    images, labels, names = accuracy_data(args)
    train_idx, val_idx, _ = stratified_split(labels, names, 0.1, seed=0)
    train, val = resident_splits(images, labels, train_idx, val_idx, device)
    seed_data = SeedDataset(images[train_idx], labels[train_idx])
    print(
        f"accuracy: {len(names)} classes, {len(train_idx)} train / {len(val_idx)} val, width {args.width}, "
        f"{epochs} epochs, seeds 0..{args.seeds - 1}, {device}",
        flush=True,
    )
    rows = []
    for seed in range(args.seeds):
        for loop in ("seed", "engine"):
            torch.manual_seed(seed)  # the same initial weights for both loops
            model, opt, precision = make_run(len(names), args.width, loop, device)
            schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
            order = torch.Generator().manual_seed(seed)
            loader = torch.utils.data.DataLoader(seed_data, batch_size=256, shuffle=True, generator=order)
            t0 = time.perf_counter()
            for _ in range(epochs):
                if loop == "seed":
                    seed_epoch(model, loader, opt, device)
                else:
                    train_one_epoch(model, train, opt, 256, order, precision=precision)
                schedule.step()
            sync(device)
            seconds = time.perf_counter() - t0
            metrics = evaluate(model, val, 1024, precision=precision)
            row = {"loop": loop, "seed": seed, "precision": dtype_name(precision.dtype)}
            rows.append(
                row | {"val_acc": metrics["val_acc"], "val_loss": metrics["val_loss"], "train_seconds": seconds}
            )
            print(f"  seed {seed} {loop}: val_acc {metrics['val_acc']:.4f} ({seconds:.0f} s)", flush=True)
    accs = {loop: [r["val_acc"] for r in rows if r["loop"] == loop] for loop in ("seed", "engine")}
    gap = float(np.mean(accs["engine"]) - np.mean(accs["seed"]))
    spread = max(max(a) - min(a) for a in accs.values())
    summary = {
        "device": device_name(device),
        "data": args.data or f"synthetic 10 shapes x {args.accuracy_per_class}",
        "classes": len(names),
        "width": args.width,
        "epochs": epochs,
        "seed_mean_val_acc": float(np.mean(accs["seed"])),
        "engine_mean_val_acc": float(np.mean(accs["engine"])),
        "gap": gap,
        "seed_to_seed_spread": spread,
        "within_noise": abs(gap) <= spread,
    }
    print("\n| loop | precision | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean |")
    print("|---|---|" + "---:|" * (args.seeds + 1))
    for loop in ("seed", "engine"):
        prec = next(r["precision"] for r in rows if r["loop"] == loop)
        print(f"| {loop} | {prec} | " + " | ".join(f"{a:.4f}" for a in accs[loop]) + f" | {np.mean(accs[loop]):.4f} |")
    verdict = "within" if summary["within_noise"] else "OUTSIDE"
    print(f"engine - seed: {gap:+.4f}; seed-to-seed spread {spread:.4f}: {verdict} noise")
    return {"summary": summary, "runs": rows}


def recipe(args) -> dict:
    """The seed recipe end to end through the core (no hydra, no mlflow): read the folder
    ``--recipe``, split 90/10, move it to the device, train ``--epochs`` (20) epochs of SketchCNN
    (``--width``) with Adam 1e-3 wd 1e-4, StepLR(10, 0.5), batch ``--batch-size`` (256) and the
    engine's defaults, evaluating every epoch. Timed from the first read to the last evaluation."""
    device = pick_device(args.device)
    epochs = args.epochs or 20
    t0 = time.perf_counter()
    ds = load_folder(args.recipe)
    train_idx, val_idx, _ = stratified_split(ds.labels, ds.class_names, 0.1, seed=0)
    train, val = resident_splits(ds.images, ds.labels, train_idx, val_idx, device)
    sync(device)
    load_s = time.perf_counter() - t0
    print(
        f"recipe: {len(ds.class_names)} classes, {len(train_idx):,} train / {len(val_idx):,} val images, "
        f"read and moved to {device} in {load_s:.1f} s",
        flush=True,
    )
    torch.manual_seed(0)
    model, opt, precision = make_run(len(ds.class_names), args.width, "engine", device)
    net = torch.compile(model) if args.compile else model
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    order = torch.Generator().manual_seed(0)
    history = []
    for epoch in range(1, epochs + 1):
        m = train_one_epoch(net, train, opt, args.batch_size, order, precision=precision)
        m |= evaluate(net, val, 1024, precision=precision)
        schedule.step()
        history.append(m)
        print(
            f"  epoch {epoch}/{epochs}: val_acc {m['val_acc']:.4f}  {m['epoch_seconds']:.1f} s  "
            f"{m['train_images_per_sec']:,.0f} img/s  (elapsed {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    total = time.perf_counter() - t0
    best = max(history, key=lambda h: h["val_acc"])
    summary = {
        "device": device_name(device),
        "data": str(args.recipe),
        "classes": len(ds.class_names),
        "train_images": len(train_idx),
        "width": args.width,
        "batch": args.batch_size,
        "epochs": epochs,
        "precision": dtype_name(precision.dtype),
        "compile": args.compile,
        "load_seconds": load_s,
        "total_seconds": total,
        "mean_train_images_per_sec": float(np.mean([h["train_images_per_sec"] for h in history])),
        "final_val_acc": history[-1]["val_acc"],
        "best_val_acc": best["val_acc"],
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    print(
        f"recipe: {total / 60:.1f} min end to end ({total:.0f} s, of which {load_s:.0f} s reading data); "
        f"val_acc final {summary['final_val_acc']:.4f}, best {summary['best_val_acc']:.4f}"
    )
    return {"summary": summary, "epochs": history}


def save(name: str, args, payload: dict) -> None:
    out = Path(args.out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta | vars(args)} | payload, indent=2) + "\n")
    print(f"saved {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--widths", default="16,64")
    ap.add_argument("--batch-size", type=int, default=256, help="the engine's batch (the seed's is 256)")
    ap.add_argument("--images", type=int, default=2560, help="images per timed training run")
    ap.add_argument("--eval-images", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="also time the engine under torch.compile")
    ap.add_argument("--profile", action="store_true", help="print and save a torch.profiler table per run")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where JSON and profiles go")
    ap.add_argument(
        "--write-data", metavar="DIR", help="only write the data as a numpy_bitmap folder (end-to-end runs)"
    )
    modes = ap.add_argument_group("other modes (instead of the throughput table)")
    modes.add_argument("--accuracy", action="store_true", help="seed loop vs engine: validation accuracy")
    modes.add_argument("--recipe", metavar="DIR", help="time the seed recipe end to end on a numpy_bitmap folder")
    modes.add_argument("--data", metavar="DIR", help="--accuracy on this numpy_bitmap folder (default: synthetic)")
    modes.add_argument("--accuracy-per-class", type=int, default=1000, help="--accuracy: drawings per class")
    modes.add_argument("--seeds", type=int, default=3, help="--accuracy: seeds per loop")
    modes.add_argument("--width", type=int, default=64, help="--accuracy/--recipe: model width")
    modes.add_argument("--epochs", type=int, help="--accuracy (default 4) / --recipe (default 20)")
    args = ap.parse_args()
    if args.write_data:
        write_folder(Path(args.write_data), args.classes, args.per_class)
        return
    if args.accuracy:
        save("bench_train_accuracy.json", args, accuracy_check(args))
        return
    if args.recipe:
        save("bench_train_recipe.json", args, recipe(args))
        return
    results = bench(args)
    print(
        "\n| width | loop | precision | batch | train img/s | input img/s | input share of train time | eval img/s "
        "| TFLOP/s (share of peak) | peak memory MB |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:,.0f}"
        print(
            f"| {r['width']} | {r['variant']} | {r['precision']} | {r['batch']} | {r['train_images_per_sec']:,.0f} | "
            f"{r['input_images_per_sec']:,.0f} | {r['input_share_of_step']:.1%} | {r['eval_images_per_sec']:,.0f} | "
            f"{r['achieved_tflops']:.3f} ({r['achieved_tflops'] / r['peak_tflops']:.1%}) | {mem} |"
        )
    for w in sorted({r["width"] for r in results}):
        seed, eng = (next(r for r in results if r["width"] == w and r["variant"] == v) for v in ("seed", "engine"))
        print(
            f"width {w}: engine/seed training {eng['train_images_per_sec'] / seed['train_images_per_sec']:.1f}x, "
            f"input path {eng['input_images_per_sec'] / seed['input_images_per_sec']:.1f}x"
        )
        compiled = next((r for r in results if r["width"] == w and r["variant"] == "engine+compile"), None)
        if compiled is not None:  # what trainer.compile's default for this device should follow
            speedup = compiled["train_images_per_sec"] / eng["train_images_per_sec"]
            print(
                f"width {w}: torch.compile trains {speedup:.2f}x the engine, evaluates "
                f"{compiled['eval_images_per_sec'] / eng['eval_images_per_sec']:.2f}x, after a "
                f"{compiled['warmup_seconds']:.0f} s warm-up ({eng['warmup_seconds']:.1f} s without)"
            )
    save("bench_train.json", args, {"results": results})


if __name__ == "__main__":
    main()
