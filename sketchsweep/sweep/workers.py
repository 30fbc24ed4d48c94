"""Start several sweep workers on one study: one per GPU (each pinned with CUDA_VISIBLE_DEVICES),
or N on the CPU. Every worker is ``python -m sketchsweep.train`` with the arguments after ``--``.

    python -m sketchsweep.workers --gpus 0,1,2,3 -- -m hparams_search=lr_width \\
        hydra.sweeper.storage=postgresql+psycopg://user@host/optuna
    python -m sketchsweep.workers --workers 2 -- -m hparams_search=lr_width hydra.sweeper.storage=...

The workers share the study through its database storage (``n_trials`` is the study's total).
Their output is prefixed with ``[gpu N]`` / ``[worker N]``. Ctrl-C (or SIGTERM) is passed on to
every worker once, so each ends its trial's MLflow run as KILLED; a second Ctrl-C kills them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from sketchsweep import cli
from sketchsweep.sweep import WORKER_ENV
from sketchsweep.sweep.storage import is_database, is_sqlite

STOP_TIMEOUT = 120  # seconds a worker gets to stop cleanly before it is killed


def parse(argv: list[str]) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """The workers (label, extra environment) and the arguments for each; errors name the option."""
    parser = argparse.ArgumentParser(prog="python -m sketchsweep.workers", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--gpus", help="comma-separated GPU indices, one worker per GPU (e.g. 0,1,2,3)")
    group.add_argument("--workers", type=int, help="number of workers, not pinned to a GPU")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of sketchsweep.train")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if "-m" not in args and "--multirun" not in args:
        parser.error("expected a sweep after --, e.g. -- -m hparams_search=lr_width hydra.sweeper.storage=...")
    storage = [a.split("=", 1)[1] for a in args if a.startswith("hydra.sweeper.storage=")]
    if not storage or not is_database(storage[-1]) or is_sqlite(storage[-1]):
        parser.error(
            "hydra.sweeper.storage: expected a database URL shared by the workers, e.g. "
            "hydra.sweeper.storage=postgresql+psycopg://user@host/optuna (a .journal file has no heartbeat, so "
            "a dead worker's trial could not be taken over; SQLite's writers lock each other out)"
        )
    if ns.gpus is not None:
        gpus = [g.strip() for g in ns.gpus.split(",") if g.strip()]
        if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
            parser.error(f"--gpus={ns.gpus}: expected distinct GPU indices separated by commas, e.g. --gpus 0,1,2,3")
        return [(f"gpu {g}", {"CUDA_VISIBLE_DEVICES": g}) for g in gpus], args
    if ns.workers < 1:
        parser.error(f"--workers={ns.workers}: expected at least 1")
    return [(f"worker {i}", {}) for i in range(ns.workers)], args


def pump(proc: subprocess.Popen, label: str) -> None:
    """Copy a worker's output to ours, each line prefixed with the worker's label."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"[{label}] {line}")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    workers, args = parse(sys.argv[1:] if argv is None else argv)
    procs: list[subprocess.Popen] = []
    threads = []
    for index, (label, extra) in enumerate(workers):
        env = {**os.environ, **extra, WORKER_ENV: str(index), "PYTHONUNBUFFERED": "1"}
        # Own session: a terminal's Ctrl-C reaches only this process, which passes it on once.
        proc = subprocess.Popen(
            [sys.executable, "-m", "sketchsweep.train", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",  # one odd byte must not stop the copying thread (the worker would block)
            start_new_session=True,
        )
        procs.append(proc)
        threads.append(threading.Thread(target=pump, args=(proc, label), daemon=True))
        threads[-1].start()

    stopping = []

    def stop(signum, frame) -> None:
        stopping.append(signum)
        sig = signal.SIGINT if len(stopping) == 1 else signal.SIGKILL
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
        if len(stopping) == 1:
            print(f"stopping {len(procs)} workers (again to kill them)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # Poll rather than wait(): a blocking wait() would not notice that a stop began meanwhile,
    # and a worker stuck after it (e.g. in MLflow's retries) would never be killed.
    deadline = None
    while any(p.poll() is None for p in procs):
        if stopping and deadline is None:
            deadline = time.monotonic() + STOP_TIMEOUT
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join(timeout=5)
    if stopping:
        return cli.INTERRUPTED
    failed = [(label, c) for (label, _), c in zip(workers, codes, strict=True) if c != 0]
    for label, c in failed:
        print(f"{label} exited with {c}", file=sys.stderr)
    return cli.FAILURE if failed else 0


if __name__ == "__main__":
    sys.exit(main())
