"""What a batch of ``n_jobs`` costs when its trials end at different times (one pruned early):
the same sweep through the basic launcher, hydra-joblib-launcher (a batch at a time) and
submitit (each trial its own job: ``submitit_local``, and ``slurm`` when ``$SLURM_CONF`` names a
cluster, e.g. ``python -m tests.slurm_cluster /tmp/slurm`` as root).

    python benchmarks/bench_launchers.py                    # ~6 min on 2 CPU cores
    python benchmarks/bench_launchers.py --trials 8 --launchers basic slurm

Each sweep: ``--trials`` trials, ``hydra.sweeper.n_jobs=2`` (basic: 1), the random sampler (seed
0) over ``trainer.epochs=choice(1,LONG)``: a 1-epoch trial stands for one pruned after its first
epoch. Width 4 on 4 synthetic classes x 120 drawings, journal storage, SQLite MLflow store, each
launcher in its own temporary folder. Wall: process start to exit. Slot-idle seconds: while the
trials ran (first run's start to last run's end), ``n_jobs`` x that span minus the seconds the
trials' MLflow runs were open: the time a slot had no trial (waiting for its batch, job start).
Prints a table, saves JSON to benchmarks/results/bench_launchers.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.data.synthetic import write_synthetic  # noqa: E402

LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local"],
    "slurm": [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=null",
        "hydra.launcher.timeout_min=60",
    ],
}


def sweep(launcher: str, data: Path, tmp: Path, trials: int, long: int) -> dict:
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    n_jobs = 1 if launcher == "basic" else 2
    args = [
        *("-m", "hydra/sweeper=optuna", "data=quickdraw", f"data.root={data}", "model.width=4", "model.hidden=16"),
        *("trainer.batch_size=32", f"mlflow.tracking_uri={uri}", "mlflow.log_model=false", "mlflow.log_onnx=false"),
        *("mlflow.log_evaluation=false", f"hydra.sweeper.storage={tmp / 'study.journal'}", f"hydra.sweep.dir={tmp}/s"),
        *("hydra.sweeper.seed=0", "hydra.sweeper.sampler=random", "hydra.sweeper.pruner=none"),
        *(f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.n_jobs={n_jobs}", f"trainer.epochs=choice(1,{long})"),
        *LAUNCHERS[launcher],
    ]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "sketchsweep.train", *args], cwd=tmp, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{launcher}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])
    spans = [(r.info.start_time / 1e3, r.info.end_time / 1e3) for r in runs if "optuna.trial" in r.data.tags]
    busy = sum(end - begin for begin, end in spans)
    span = max(e for _, e in spans) - min(b for b, _ in spans)
    return {
        "launcher": launcher,
        "n_jobs": n_jobs,
        "trials": len(spans),
        "wall_s": round(wall, 1),
        "trials_span_s": round(span, 1),
        "trial_run_s": round(busy, 1),
        "slot_idle_s": round(n_jobs * span - busy, 1),
        "slot_idle_share": round((n_jobs * span - busy) / (n_jobs * span), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--long", type=int, default=12, help="epochs of a long trial")
    found = [k for k in LAUNCHERS if k != "slurm" or "SLURM_CONF" in os.environ]
    parser.add_argument("--launchers", nargs="+", choices=list(LAUNCHERS), default=found)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_launchers.json")
    a = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic(Path(tmp) / "tiny", num_classes=4, per_class=120, seed=0)
        for launcher in a.launchers:
            folder = Path(tmp) / launcher
            folder.mkdir()
            rows.append(sweep(launcher, data, folder, a.trials, a.long))
            print(rows[-1], flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "python": platform.python_version()}
    a.out.write_text(json.dumps({**meta, "args": vars(a) | {"out": str(a.out)}, "rows": rows}, indent=1) + "\n")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
