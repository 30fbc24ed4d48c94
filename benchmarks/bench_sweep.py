"""The harness's fixed costs: a sweep's overhead per trial, a single run's time to its first epoch
and the quickstart run's end-of-run deliverables.

    python benchmarks/bench_sweep.py                        # ~4 min on 2 CPU cores
    python benchmarks/bench_sweep.py --trials 5 --skip-quickstart
    python benchmarks/bench_sweep.py --skip-sweep --pt2 3      # is the pt2 model worth its cost?

Every measurement runs the real command from this checkout (``python -m sketchsweep.train``), with
the default deliverables (``mlflow.log_*`` as configured), each phase into its own fresh SQLite
MLflow store in a temporary folder (created before the clock starts). The data is a fixed
synthetic set (10 classes x 300 drawings, written once); the model is SketchCNN width 16.

- **sweep**: ``-m hydra/sweeper=optuna hydra/launcher=basic`` with journal storage, 20 trials of 1
  epoch, TPE over ``optimizer.lr``. Wall: process start to exit. Each trial's train+eval seconds
  are read back from its MLflow run (per-epoch ``epoch_seconds``, plus ``val_seconds`` where the run
  logs it; without it the validation pass counts as overhead, and the table says so). Overhead
  per trial = (wall - sum of train+eval) / trials. The wall is also split into the sweep's start
  (to the first trial's run), the trials' runs (in-run overhead: run time - train - eval), the gaps
  between trials' runs (the sampler, Hydra's job setup, the next trial's data, model and optimizer
  before its run opens), and the end (last trial's run to exit: the study's deliverables, plots).
- **single run**: the same data and model, 1 epoch, run twice (the second is "warm"). Time to the
  first epoch: process start to the first epoch's metric timestamp; "startup" takes the epoch's
  own train+eval seconds out of that. End of run: the last epoch's metric to the run's end.
- **quickstart**: ``experiment=quickstart`` (its data generated beforehand); end-of-run
  deliverables = the last epoch's metric timestamp to the MLflow run's end (weights, evaluation
  artifacts, models, ONNX export, file uploads).
- **pt2** (``--pt2 N``): the quickstart run N times with ``mlflow.log_model=true`` and N times with
  ``false``, alternating; the medians of its end-of-run seconds and MLflow store size.

Disk per trial: the sweep's MLflow store + sweep folder + journal, over the trials. Targets (sweeps
issue, 2 CPU cores): overhead <= 1.0 s per trial, time to first epoch <= 6 s warm, quickstart
end-of-run deliverables <= 6 s. Prints a table, saves JSON to benchmarks/results/bench_sweep.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.data.synthetic import cache_folder, write_synthetic  # noqa: E402

TARGETS = {"overhead_per_trial_s": 1.0, "time_to_first_epoch_s": 6.0, "quickstart_end_of_run_s": 6.0}
BENCH_MODEL = ["model.width=16", "trainer.batch_size=128"]


def train(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``python -m sketchsweep.train`` from this checkout; its (start, end) wall-clock times."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "sketchsweep.train", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    end = time.time()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed (exit {proc.returncode}); its output: {log}")
    return start, end


def new_store(folder: Path) -> str:
    """A fresh SQLite store, its tables created now (a first contact costs seconds, not timed)."""
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def runs_of(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], max_results=5000)) if exp else []


def epochs_of(uri: str, run) -> list[dict[str, float]]:
    """Per epoch: its metric timestamp (s) and its train and eval seconds (eval: 0 when not logged)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rid = run.info.run_id
    train = {m.step: m for m in client.get_metric_history(rid, "epoch_seconds")}
    evals = {m.step: m.value for m in client.get_metric_history(rid, "val_seconds")}
    speed = {m.step: m.value for m in client.get_metric_history(rid, "train_images_per_sec")}
    return [
        {"at": train[s].timestamp / 1000, "train_s": train[s].value, "eval_s": evals.get(s, 0.0), "img_s": speed[s]}
        for s in sorted(train)
    ]


def speed(epochs: list[dict[str, float]]) -> float:
    """Median training images/s: how busy the machine was (2 idle cores: ~2,000 at width 16)."""
    return statistics.median(e["img_s"] for e in epochs)


def disk(*paths: Path) -> int:
    """Bytes of the files under ``paths``, a file hard-linked in several places counted once."""
    files = {}
    for p in paths:
        for f in [p] if p.is_file() else p.rglob("*") if p.exists() else []:
            if f.is_file() and not f.is_symlink():
                st = f.stat()
                files[st.st_dev, st.st_ino] = st.st_size
    return sum(files.values())


def single_run(tmp: Path, data: Path, name: str) -> dict:
    uri = new_store(tmp / f"{name}-mlruns")
    args = ["data=quickdraw", f"data.root={data}", "trainer.epochs=1", *BENCH_MODEL]
    args += [f"mlflow.tracking_uri={uri}", f"hydra.run.dir={tmp / name}"]
    load = os.getloadavg()[0]
    start, end = train(args, tmp / f"{name}.log")
    (run,) = runs_of(uri, "sketchsweep")
    epochs = epochs_of(uri, run)
    first = epochs[0]
    return {
        "load_at_start": load,
        "train_images_per_s": speed(epochs),
        "wall_s": end - start,
        "time_to_first_epoch_s": first["at"] - start,
        "startup_s": first["at"] - start - first["train_s"] - first["eval_s"],
        "to_run_start_s": run.info.start_time / 1000 - start,
        "end_of_run_s": run.info.end_time / 1000 - epochs[-1]["at"],
        "eval_logged": first["eval_s"] > 0,
    }


def quickstart(tmp: Path, name: str = "quickstart", extra: tuple[str, ...] = ()) -> dict:
    uri = new_store(tmp / f"{name}-mlruns")
    root = tmp / "synthetic"
    write_synthetic(cache_folder(root, 10, 600, 0), 10, 600, 0)  # experiment=quickstart's set
    args = ["experiment=quickstart", f"data.root={root}", f"mlflow.tracking_uri={uri}", *extra]
    load = os.getloadavg()[0]
    start, end = train([*args, f"hydra.run.dir={tmp / name}"], tmp / f"{name}.log")
    (run,) = runs_of(uri, "quickstart")
    epochs = epochs_of(uri, run)
    return {
        "load_at_start": load,
        "train_images_per_s": speed(epochs),
        "wall_s": end - start,
        "epochs": len(epochs),
        "train_eval_s": sum(e["train_s"] + e["eval_s"] for e in epochs),
        "end_of_run_s": run.info.end_time / 1000 - epochs[-1]["at"],
    }


def sweep(tmp: Path, data: Path, trials: int) -> dict:
    uri = new_store(tmp / "sweep-mlruns")
    journal, folder = tmp / "bench.journal", tmp / "sweep"
    args = [
        "-m", "hydra/sweeper=optuna", "hydra/launcher=basic", f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.seed=0", f"hydra.sweeper.storage={journal}", "hydra.sweeper.study_name=bench",
        "trainer.epochs=1", "optimizer.lr=tag(log, interval(1e-4, 1e-2))", "data=quickdraw", f"data.root={data}",
        *BENCH_MODEL, f"mlflow.tracking_uri={uri}", f"hydra.sweep.dir={folder}",
    ]  # fmt: skip
    load = os.getloadavg()[0]
    start, end = train(args, tmp / "sweep.log")
    runs = runs_of(uri, "sketchsweep")
    kids = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time)
    if len(kids) != trials:
        sys.exit(f"expected {trials} trial runs, found {len(kids)}: see {tmp / 'sweep.log'}")
    spans = [(r.info.start_time / 1000, r.info.end_time / 1000) for r in kids]
    per_trial = [epochs_of(uri, r) for r in kids]
    work = [sum(e["train_s"] + e["eval_s"] for e in epochs) for epochs in per_trial]
    wall, busy = end - start, sum(work)
    in_run = sum(e - s for s, e in spans) - busy
    gaps = sum(max(0.0, nxt[0] - prev[1]) for prev, nxt in itertools.pairwise(spans))
    size = disk(tmp / "sweep-mlruns", folder, journal)
    return {
        "load_at_start": load,
        "train_images_per_s": speed([e for epochs in per_trial for e in epochs]),
        "trials": trials,
        "wall_s": wall,
        "train_eval_s": busy,
        "overhead_per_trial_s": (wall - busy) / trials,
        "training_share": busy / wall,
        "sweep_start_s": spans[0][0] - start,
        "in_run_overhead_per_trial_s": in_run / trials,
        "between_trials_per_trial_s": gaps / max(1, trials - 1),
        "sweep_end_s": end - spans[-1][1],
        "disk_per_trial_mb": size / trials / 1e6,
        "eval_logged": any(e["eval_s"] > 0 for e in per_trial[0]),
    }


def pt2_cost(tmp: Path, rounds: int) -> dict:
    """The quickstart run with and without ``mlflow.log_model`` (the pt2 model), alternating so
    that load from other processes falls on both alike: median end-of-run seconds and store size."""
    runs: dict[str, list[dict]] = {"true": [], "false": []}
    for i in range(rounds):
        for on in runs:
            r = quickstart(tmp, f"pt2-{on}-{i}", (f"mlflow.log_model={on}",))
            runs[on].append(r | {"store_mb": disk(tmp / f"pt2-{on}-{i}-mlruns") / 1e6})
    median = {
        on: {k: statistics.median(r[k] for r in rs) for k in ("end_of_run_s", "store_mb")} for on, rs in runs.items()
    }
    return {"runs": runs, "median": median}


def row(name: str, value: float, unit: str, target: float | None = None) -> str:
    verdict = "" if target is None else ("met" if value <= target else f"**missed** (target <= {target:g} {unit})")
    return f"| {name} | {value:.2f} {unit} | {verdict} |"


def busy(phase: str, r: dict) -> str:
    """How loaded the machine was: times above are only comparable at similar training speeds."""
    value = f"{r['train_images_per_s']:,.0f} img/s, {r['load_at_start']:.1f}"
    return f"| {phase}: training speed, load average at start | {value} | |"


def report(results: dict) -> None:
    s, q, one = results.get("sweep"), results.get("quickstart"), results.get("single_runs")
    lines = ["", "| measure | value | target |", "| --- | ---: | --- |"]
    if s:
        note = "" if s["eval_logged"] else " (eval time not logged: counted as overhead)"
        lines += [
            row(f"sweep wall ({s['trials']} trials of 1 epoch)", s["wall_s"], "s"),
            row(f"sum of the trials' train+eval{note}", s["train_eval_s"], "s"),
            row("overhead per trial", s["overhead_per_trial_s"], "s", TARGETS["overhead_per_trial_s"]),
            f"| share of wall spent training | {s['training_share']:.0%} | |",
            row("  sweep start (to the first trial's run)", s["sweep_start_s"], "s"),
            row("  in-run overhead per trial", s["in_run_overhead_per_trial_s"], "s"),
            row("  between trials, per trial", s["between_trials_per_trial_s"], "s"),
            row("  sweep end (last trial's run to exit)", s["sweep_end_s"], "s"),
            row("disk per trial", s["disk_per_trial_mb"], "MB"),
            busy("sweep", s),
        ]
    if one:
        warm = one[-1]
        first = warm["time_to_first_epoch_s"]
        lines += [
            row("single run: time to first epoch (warm)", first, "s", TARGETS["time_to_first_epoch_s"]),
            row("  of which startup (without the epoch's train+eval)", warm["startup_s"], "s"),
            row("  process start to the MLflow run's start", warm["to_run_start_s"], "s"),
            row("single run: end of run (last epoch to run end)", warm["end_of_run_s"], "s"),
            busy("single run", warm),
        ]  # fmt: skip
    if q:
        target = TARGETS["quickstart_end_of_run_s"]
        lines.append(row("quickstart: end-of-run deliverables", q["end_of_run_s"], "s", target))
        lines += [row("quickstart: wall", q["wall_s"], "s"), busy("quickstart", q)]
    if p := results.get("pt2"):
        on, off = p["median"]["true"], p["median"]["false"]
        n = len(p["runs"]["true"])
        lines += [
            row(f"quickstart end of run, mlflow.log_model=true (median of {n})", on["end_of_run_s"], "s"),
            row(f"quickstart end of run, mlflow.log_model=false (median of {n})", off["end_of_run_s"], "s"),
            row("  the pt2 model's cost per run", on["end_of_run_s"] - off["end_of_run_s"], "s"),
            row("  the pt2 model's disk per run (MLflow store)", on["store_mb"] - off["store_mb"], "MB"),
        ]
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the stores, run folders and logs in this (new) folder")
    ap.add_argument(
        "--pt2", type=int, default=0, metavar="N", help="also N quickstart runs with and N without the pt2 model"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep.resolve() if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=bool(not args.keep))
        data = write_synthetic(tmp / "data", args.classes, args.per_class, seed=0)
        results: dict = {"single_runs": [single_run(tmp, data, f"single{i}") for i in (1, 2)]}
        if not args.skip_quickstart:
            results["quickstart"] = quickstart(tmp)
        if not args.skip_sweep:
            results["sweep"] = sweep(tmp, data, args.trials)
        if args.pt2:
            results["pt2"] = pt2_cost(tmp, args.pt2)
    report(results)
    out = ROOT / "benchmarks" / "results" / "bench_sweep.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "mlflow": metadata.version("mlflow"),
        **{k: str(v) for k, v in vars(args).items()},
    }
    out.write_text(json.dumps({"meta": meta, "targets": TARGETS, "results": results}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
