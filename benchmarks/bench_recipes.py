"""Accuracy and calibration of training recipes on the 24 real classes (``../shared/data/quickdraw``,
1,500 drawings each): each recipe and seed is trained by the real command, then scored on its
held-out test split (``data.test_fraction=0.1``, 150 drawings per class, never seen in training
or model selection):

- top-1 / top-3 and ECE (15 bins) of the kept weights, as ``evaluate --split test`` computes them;
- ECE after a temperature fitted on the validation split (what ``export --calibrate`` folds in);
- top-1 / top-3 with test-time augmentation (``evaluate --tta``).

    python benchmarks/bench_recipes.py --recipes best --seeds 0 1 2       # ~20 min a seed on 2 CPU cores
    python benchmarks/bench_recipes.py --recipes seed --seeds 0 --runs /tmp/recipes

Run folders are ``<runs>/<recipe>-s<seed>``; one that already holds a finished run
(``model_weights.pth``) is scored, not trained again, so an interrupted benchmark goes on where it
stopped (a folder with an unfinished run is an error: resume it, or remove it). Wall time is the
training command's, start to exit (from its ``train.log`` for a run trained earlier). Prints a
table per run and one per recipe (mean ± standard deviation over seeds), saves JSON to
benchmarks/results/bench_recipes.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.calibration import fit_temperature  # noqa: E402
from sketchsweep.checkpoint import Checkpoint, load_trained  # noqa: E402
from sketchsweep.engine import all_logits, evaluate  # noqa: E402
from sketchsweep.evaluation import predict, scores  # noqa: E402
from sketchsweep.model import count_parameters  # noqa: E402
from sketchsweep.modelref import ModelRef  # noqa: E402
from sketchsweep.run_data import load_target  # noqa: E402
from sketchsweep.tta import SHIFTS  # noqa: E402

RECIPES = {
    # The seed recipe (the defaults: width 64, Adam, StepLR, 20 epochs, no augmentation).
    "seed": ["experiment=quickdraw24", "model.width=64", "trainer.epochs=20", "data.test_fraction=0.1"],
    # What experiment=quickdraw24 trained before the quality knobs: width 32, 10 epochs.
    "quickdraw24": ["experiment=quickdraw24", "data.test_fraction=0.1"],
    "best": ["experiment=quickdraw24_best"],
}
COMMON = ["trainer.eval_batch_size=256", "mlflow.experiment_name=recipes"]  # 256: faster than 1024 on a CPU


def train(recipe: str, extra: list[str], seed: int, folder: Path, store: str) -> float:
    """Train one recipe and seed into ``folder``; returns the command's wall seconds."""
    args = [
        *RECIPES[recipe],
        *COMMON,
        *extra,
        f"seed={seed}",
        f"hydra.run.dir={folder}",
        f"mlflow.tracking_uri={store}",
    ]
    print(f"training {recipe} seed {seed}: python -m sketchsweep.train {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sketchsweep.train", *args], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed}: the training command failed (exit {proc.returncode}); see {folder}")
    return time.perf_counter() - start


def logged_wall(folder: Path) -> float | None:
    """First to last timestamp of a run's train.log (a run trained before this benchmark ran)."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]", (folder / "train.log").read_text(), re.M)
    if len(stamps) < 2:
        return None
    first, last = (datetime.datetime.fromisoformat(s) for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def score(recipe: str, seed: int, folder: Path, wall: float | None) -> dict:
    """The run's test-split figures (see the module docstring), with its validation figures: the
    project's own evaluation (``engine.evaluate``, ``evaluation.predict``), as the commands score."""
    ref = ModelRef.parse(folder)
    trained = load_trained(ref)
    ckpt = Checkpoint.load(folder / "checkpoint.pt")
    at_best = ckpt.history[ckpt.best["epoch"] - 1]
    device = torch.device("cpu")
    val, test = (load_target(trained, ref, [], split, device).rows for split in ("val", "test"))
    t = fit_temperature(*all_logits(trained.model, val, 256))
    plain = evaluate(trained.model, test, 256, "test", temperature=t)  # ECE with t, and without
    tta = scores(predict(trained.model, test, 256, shifts=SHIFTS), test.labels.numpy(), "tta_")
    return {
        "recipe": recipe,
        "seed": seed,
        "params": count_parameters(trained.model),
        "epochs": len(ckpt.history),
        "best_epoch": ckpt.best["epoch"],
        "wall_s": round(wall, 1) if wall is not None else None,
        "val_acc": at_best["val_acc"],
        "test_acc": plain["test_acc"],
        "test_top3": plain["test_top3"],
        "test_ece": plain["test_ece_uncalibrated"],
        "temperature": t,
        "test_ece_calibrated": plain["test_ece"],
        "tta_test_acc": tta["tta_top1"],
        "tta_test_top3": tta["tta_top3"],
        "test_n": len(test),
    }


def summary(rows: list[dict]) -> list[dict]:
    """Per recipe: mean ± standard deviation over its seeds of every figure."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        line = {"recipe": recipe, "seeds": len(mine), "params": mine[0]["params"], "epochs": mine[0]["epochs"]}
        for k in ("wall_s", "val_acc", "test_acc", "test_top3", "test_ece", "test_ece_calibrated", "tta_test_acc"):
            values = [r[k] for r in mine if r[k] is not None]
            mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            pct = k != "wall_s"
            line[k] = f"{100 * mean:.2f} ± {100 * sd:.2f}" if pct else f"{mean / 60:.1f} ± {sd / 60:.1f} min"
        out.append(line)
    return out


def table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["seed", "best"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "bench_recipes", help="run folders")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. a candidate's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_recipes.json")
    a = parser.parse_args()
    store = f"sqlite:///{(a.runs / 'mlflow.db').resolve()}"
    rows = []
    for recipe in a.recipes:
        for seed in a.seeds:
            folder = (a.runs / f"{recipe}-s{seed}").resolve()
            if (folder / "model_weights.pth").is_file():
                wall = logged_wall(folder)
            elif folder.exists():
                raise SystemExit(f"{folder}: an unfinished run (no model_weights.pth): resume or remove it")
            else:
                wall = train(recipe, a.extra, seed, folder, store)
            rows.append(score(recipe, seed, folder, wall))
            print(rows[-1], flush=True)
    table(rows)
    table(summary(rows))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "python": platform.python_version()}
    meta |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
    a.out.write_text(json.dumps({**meta, "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
