"""Optuna storage under load: N worker processes on one study, each asking trials, reporting an
intermediate value per "epoch" (with the pruner's should_prune, as a sweep's training loop does)
and telling the result. PostgreSQL (RDBStorage) vs the JournalStorage file backend.

    python benchmarks/bench_storage.py                      # 8 workers x 25 trials x 10 epochs
    python benchmarks/bench_storage.py --postgres postgresql+psycopg://user@host/db   # an existing server

Without --postgres it starts a throwaway PostgreSQL cluster (initdb in PATH or
/usr/lib/postgresql/*/bin; as root it runs as the postgres user). Needs only optuna and psycopg.
Prints a table and writes benchmarks/results/bench_storage.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

RESULTS = Path(__file__).parent / "results"


def make_storage(spec: str):
    if "://" in spec:
        return optuna.storages.RDBStorage(spec, engine_kwargs={"pool_pre_ping": True})
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(spec))


def worker(spec: str, study_name: str, trials: int, epochs: int, epoch_seconds: float, out) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Random sampling: the sampler's own cost (TPE grows with the study) is not what is measured.
    study = optuna.load_study(
        study_name=study_name,
        storage=make_storage(spec),
        sampler=optuna.samplers.RandomSampler(),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1000),  # reads the study, never prunes
    )
    latencies = []
    start = time.time()  # wall clock: comparable across the worker processes
    for _ in range(trials):
        trial = study.ask()
        x = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        for epoch in range(1, epochs + 1):
            if epoch_seconds:
                time.sleep(epoch_seconds)
            t0 = time.perf_counter()
            trial.report(x * epoch, step=epoch)
            trial.should_prune()
            latencies.append(time.perf_counter() - t0)
        study.tell(trial, x)
    out.put((start, time.time(), latencies))


def run(spec: str, workers: int, trials: int, epochs: int, epoch_seconds: float) -> dict:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=make_storage(spec), direction="minimize")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(spec, name, trials, epochs, epoch_seconds, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    spans = [out.get() for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(x for _, _, lat in spans for x in lat)
    # From the first worker's first ask to the last one's last tell (process start-up excluded).
    wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    n = len(optuna.load_study(study_name=name, storage=make_storage(spec)).trials)
    return {
        "trials": n,
        "wall_s": round(wall, 2),
        "trials_per_min": round(n / wall * 60, 1),
        "reports": len(latencies),
        "report_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "report_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
    }


class ThrowawayPostgres:
    """initdb + pg_ctl in a temp folder, on 127.0.0.1 and a free port (as the postgres user when root)."""

    def __init__(self) -> None:
        found = shutil.which("initdb")
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        initdb = Path(found).resolve() if found else (versions[-1] if versions else None)
        if initdb is None:
            sys.exit("no PostgreSQL binaries (initdb); install Debian's postgresql or pass --postgres URL")
        self.bin, self.dir = initdb.parent, Path(tempfile.mkdtemp(prefix="bench-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.user = {}
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        data = str(self.dir / "data")
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync")
        # Default durability settings (fsync on): the figures are for a real server, not the tests' one.
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200"
        self._run("pg_ctl", "-D", data, "-l", str(self.dir / "log"), "-o", opts, "-w", "start")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bin / tool), *args], check=True, capture_output=True, **self.user)

    def close(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=25, help="trials per worker")
    parser.add_argument("--epochs", type=int, default=10, help="intermediate values reported per trial")
    parser.add_argument("--epoch-seconds", type=float, default=0.0, help="simulated training time per epoch")
    parser.add_argument("--postgres", help="an existing PostgreSQL URL; default: a throwaway cluster")
    a = parser.parse_args()
    pg = None if a.postgres else ThrowawayPostgres()
    tmp = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    backends = {"postgresql": a.postgres or pg.url, "journal file": str(tmp / "study.journal")}
    rows = {}
    try:
        for label, spec in backends.items():
            rows[label] = run(spec, a.workers, a.trials, a.epochs, a.epoch_seconds)
    finally:
        if pg is not None:
            pg.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{a.workers} workers x {a.trials} trials x {a.epochs} reports (report = report + should_prune)")
    print(f"{'storage':<14}{'trials':>8}{'wall s':>9}{'trials/min':>12}{'p50 ms':>9}{'p99 ms':>9}")
    for label, r in rows.items():
        print(
            f"{label:<14}{r['trials']:>8}{r['wall_s']:>9}{r['trials_per_min']:>12}"
            f"{r['report_p50_ms']:>9}{r['report_p99_ms']:>9}"
        )
    RESULTS.mkdir(exist_ok=True)
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "optuna": optuna.__version__,
        "args": vars(a) | {"postgres": "throwaway" if pg else "given"},
        "results": rows,
    }
    (RESULTS / "bench_storage.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
