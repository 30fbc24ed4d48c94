"""The same Optuna search with and without median pruning: epochs trained and best val_acc.

    python benchmarks/bench_pruning.py                 # 24 trials x 8 epochs each way, ~6 min on 2 CPU cores

Both sweeps run the real command (`python -m sketchsweep.train -m hydra/sweeper=optuna ...`) on
synthetic sketches, with the same TPE seed and search space, into a temporary MLflow store and
Journal storage. Target (sweeps issue): pruning trains <= 50% of the epochs and finds a best
val_acc within 0.5 points. Prints a table, saves JSON to benchmarks/results/bench_pruning.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.sweep.storage import open_storage  # noqa: E402


def run_sweep(tmp: Path, pruner: str, args) -> dict:
    journal = tmp / f"{pruner}.journal"
    cmd = [
        sys.executable, "-m", "sketchsweep.train", "-m", "hydra/sweeper=optuna",
        f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.seed=0", f"hydra.sweeper.pruner={pruner}",
        f"hydra.sweeper.pruner_kwargs={{n_startup_trials:5,n_warmup_steps:{args.warmup}}}" if pruner != "none" else "",
        f"hydra.sweeper.storage={journal}", "hydra.sweeper.study_name=bench",
        "optimizer.lr=tag(log,interval(1e-5,3e-2))", "optimizer.weight_decay=tag(log,interval(1e-6,1e-1))",
        "model.width=choice(4,8,16)", f"trainer.epochs={args.epochs}", "trainer.batch_size=128",
        f"data.root={tmp / 'data'}", f"data.synthetic.per_class={args.per_class}", "model.hidden=64",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"mlflow.experiment_name={pruner}",
        "mlflow.log_model=false", f"hydra.sweep.dir={tmp / pruner}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run([c for c in cmd if c], cwd=tmp, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="bench", storage=open_storage(str(journal)))
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    epochs = sum(args.epochs if t.state == TrialState.COMPLETE else max(t.intermediate_values) for t in trials)
    return {
        "pruner": pruner,
        "trials": len(trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "epochs_trained": int(epochs),
        "epochs_possible": args.epochs * len(trials),
        "best_val_acc": study.best_value,
        "best_params": study.best_params,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=1, help="median pruner's n_warmup_steps (epochs never pruned)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_sweep(Path(tmp), p, args) for p in ("none", "median")]
    base, pruned = results
    print("\n| pruner | trials | pruned | epochs trained | best val_acc | wall s |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['pruner']} | {r['trials']} | {r['pruned']} | {r['epochs_trained']} / {r['epochs_possible']} | "
            f"{r['best_val_acc']:.4f} | {r['seconds']:.0f} |"
        )
    share = pruned["epochs_trained"] / base["epochs_trained"]
    gap = 100 * (base["best_val_acc"] - pruned["best_val_acc"])
    print(f"\npruning trains {share:.0%} of the epochs; best val_acc {gap:+.2f} points below no pruning")
    out = ROOT / "benchmarks" / "results" / "bench_pruning.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), **vars(args)}
    out.write_text(json.dumps({"meta": meta, "results": results, "epoch_share": share, "gap_points": gap}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
