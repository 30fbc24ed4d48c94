"""Throughput and latency of ``POST /api/predict`` with strokes, on the real server over loopback.

    python benchmarks/bench_serve.py MODEL                      # e.g. a run's model.onnx
    python benchmarks/bench_serve.py MODEL --requests 2000 --clients 1 2 4

Starts ``python -m sketchsweep.serve MODEL --port 0``, then for each client count sends a bounded
load: that many threads, each on its own keep-alive connection, sending requests back to back
(``--requests`` in all), each a drawing as the page sends it (real ones from
``../shared/data/ndjson`` when there, else synthetic ones, in a 400 px canvas's coordinates).
Latency is one request's round trip as the client sees it; requests/s is all of them over the wall
time. The clients share the machine with the server, as a browser on the same laptop would.
Target (browser issue): p50 <= 10 ms, >= 200 requests/s on 2 cores. Prints a table, saves JSON to
benchmarks/results/bench_serve.json.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sketchsweep.data.synthetic import SHAPES, jitter  # noqa: E402

NDJSON = ROOT.parent / "shared" / "data" / "ndjson"
JSON = {"Content-Type": "application/json"}


def drawings(n: int) -> tuple[list[bytes], str]:
    """``n`` request bodies, and where their drawings came from."""
    files = sorted(NDJSON.glob("*.ndjson")) if NDJSON.is_dir() else []
    if files:
        with files[0].open() as f:
            raw = [json.loads(line)["drawing"] for _, line in zip(range(n), f, strict=False)]
        source = f"{files[0].name} (real)"
    else:
        rng = np.random.default_rng(0)
        names = sorted(SHAPES)
        shapes = [jitter(SHAPES[names[i % len(names)]](rng), rng) for i in range(n)]
        raw = [[[list(s[:, 0] * 150 + 200), list(s[:, 1] * 150 + 200)] for s in d] for d in shapes]
        source = "synthetic shapes"
    # Quick, Draw!'s 0-255 box scaled into a 400 px canvas, as the page sends it.
    bodies = [
        json.dumps({"strokes": [[[x * 1.5 + 8 for x in xs], [y * 1.5 + 8 for y in ys]] for xs, ys in d]}).encode()
        for d in raw
    ]
    return bodies, source


def start(model: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sketchsweep.serve", model, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("serving "):
            return proc, int(line.split(" at ")[1].split()[0].rstrip("/").rsplit(":", 1)[1])
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def load(port: int, bodies: list[bytes], clients: int, total: int) -> dict:
    """``total`` requests from ``clients`` threads; latencies in ms."""
    latencies: list[float] = []
    errors = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        # http.client sends the headers and the body in two writes: without TCP_NODELAY (which
        # browsers set) the body waits ~40 ms on Nagle's algorithm and the server's delayed ACK.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mine = []
        for i in range(k, total, clients):
            t = time.perf_counter()
            conn.request("POST", "/api/predict", body=bodies[i % len(bodies)], headers=JSON)
            response = conn.getresponse()
            answer = response.read()
            mine.append((time.perf_counter() - t) * 1000)
            if response.status != 200:
                errors.append(f"{response.status} {answer[:200]!r}")
        conn.close()
        latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start_time = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start_time
    if errors:
        raise SystemExit(f"{len(errors)} of {total} requests failed, e.g. {errors[0]}")
    q = statistics.quantiles(latencies, n=100)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(q[49], 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(max(latencies), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="anything predict accepts: an .onnx file, a run folder, ...")
    parser.add_argument("--requests", type=int, default=2000, help="per client count (default 2000)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serve.json")
    args = parser.parse_args()
    bodies, source = drawings(200)
    proc, port = start(args.model)
    try:
        load(port, bodies, 1, 50)  # warm-up: ONNX Runtime's first runs, the thread pool
        rows = [load(port, bodies, c, args.requests) for c in args.clients]
    finally:
        proc.terminate()
        proc.wait()
    points = [sum(len(xs) for xs, _ in json.loads(b)["strokes"]) for b in bodies]
    print(f"model {args.model}; drawings: {source}, {statistics.median(points):.0f} points (median)")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>7} "
            f"{r['p50_ms']:>7} {r['p99_ms']:>7} {r['max_ms']:>7}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "model": args.model,
        "drawings": source,
        "median_points": statistics.median(points),
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
