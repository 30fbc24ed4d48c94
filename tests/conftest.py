"""Shared fixtures: tiny datasets written in the real on-disk format, a throwaway MLflow
store per test, and a runner for the real `python -m sketchsweep.train` command.

Hydra is imported only where a config is composed, so the core's tests (test_engine,
test_cuda) run on a GPU box that has only torch, numpy and pytest (benchmarks/gpu.sh)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sketchsweep.data.synthetic import write_synthetic

PROJECT_ROOT = Path(__file__).resolve().parents[1]

SHARED_QUICKDRAW = PROJECT_ROOT.parent / "shared" / "data" / "quickdraw"
RUN_SLOW = os.environ.get("SKETCHSWEEP_SLOW_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked slow keep the default suite under 5 minutes; CI runs them too."""
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: run with SKETCHSWEEP_SLOW_TESTS=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 synthetic classes x 120 drawings: a numpy_bitmap folder, fast to train on."""
    return write_synthetic(tmp_path_factory.mktemp("data") / "tiny", num_classes=4, per_class=120, seed=0)


@pytest.fixture
def store(tmp_path) -> str:
    """A fresh SQLite MLflow store (artifacts beside it) for one test."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def tiny_overrides(data: Path, store: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=quickdraw",
        f"data.root={data}",
        "model.width=8",
        "model.hidden=32",
        "trainer.epochs=3",
        "trainer.batch_size=32",
        f"mlflow.tracking_uri={store}",
        "mlflow.log_model=false",
        "mlflow.log_onnx=false",
        "mlflow.log_evaluation=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def width4_overrides(data: Path, store: str, *extra: str) -> list[str]:
    """An in-process run (``train(compose_config(...))``) of a width-4 model on ``data``, batch 64,
    nothing shipped: the fastest run that still trains."""
    return [
        "data=quickdraw",
        f"data.root={data}",
        "model.width=4",
        "model.hidden=16",
        "trainer.batch_size=64",
        f"mlflow.tracking_uri={store}",
        "mlflow.log_model=false",
        "mlflow.log_onnx=false",
        "mlflow.log_evaluation=false",
        *extra,
    ]


def sweep_overrides(
    data: Path, storage: str, uri: str, sweep_dir: Path, study: str, *extra: str, epochs: int = 4
) -> list[str]:
    """An Optuna multirun of tiny trials (width 4) on ``data``: the study in ``storage``, runs in ``uri``."""
    return [
        "-m",
        "hydra/sweeper=optuna",
        "data=quickdraw",
        f"data.root={data}",
        "model.width=4",
        "model.hidden=16",
        f"trainer.epochs={epochs}",
        "trainer.batch_size=32",
        f"mlflow.tracking_uri={uri}",
        "mlflow.log_model=false",
        "mlflow.log_onnx=false",
        "mlflow.log_evaluation=false",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.seed=0",
        *extra,
    ]


def cli_env() -> dict[str, str]:
    """This environment without what would steer a command (MLflow's and Hydra's settings, the
    passwords a sweep hands its jobs): each test says what it runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_", "SKETCHSWEEP_SECRET_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cli(
    overrides: list[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real entry point, as a user would, from ``cwd`` (in ``env``: ``cli_env()`` by default)."""
    return subprocess.run(
        [sys.executable, "-m", "sketchsweep.train", *overrides],
        cwd=cwd,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_train(args: list[str], cwd: Path, **popen: Any) -> subprocess.Popen:
    """The real entry point started in the background (a sweep with ``-m`` in ``args``), output
    merged into ``stdout`` as text, in ``cli_env()``, unless ``popen`` says otherwise."""
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "env": cli_env()}
    return subprocess.Popen([sys.executable, "-m", "sketchsweep.train", *args], cwd=cwd, **options | popen)


def rows_with_labels(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Images (uint8 rows) with their labels as a sorted list: equal for the same multiset of pairs."""
    return sorted(bytes([int(label)]) + row.tobytes() for row, label in zip(x, y, strict=True))


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from sketchsweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


# -- Real servers for the scale-out tests: a throwaway PostgreSQL cluster and an MLflow server ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of initdb/pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


class Postgres:
    """A PostgreSQL cluster initdb'd in a temp folder, on 127.0.0.1 and a free port, trust auth.

    PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (which
    Debian's package creates) or ``nobody``, owning the folder."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin, self.port = bin_dir, free_port()
        # Not under pytest's tmp_path: that is 0700 and root's, so the server's user could not enter it.
        self.dir = Path(tempfile.mkdtemp(prefix="sketchsweep-pg-"))
        self.user: dict = {}
        if os.geteuid() == 0:
            import pwd

            account = next((n for n in ("postgres", "nobody") if _has_user(n)), None)
            if account is None:
                pytest.skip("PostgreSQL cannot run as root and there is no postgres/nobody user to run it as")
            pw = pwd.getpwnam(account)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self._pg("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        proc = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True, timeout=120, **self.user)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start(self) -> None:
        # fsync off: a throwaway cluster needs no durability, and the tests get faster.
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c synchronous_commit=off"
        opts += " -c max_connections=300"
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-o", opts, "-w", "start")

    def stop(self) -> None:
        # immediate: nothing to keep, and a clean shutdown waits for the MLflow server's connections.
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session; skipped only when its binaries are absent."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL binaries not found (no initdb in PATH or /usr/lib/postgresql/*/bin); "
            "`make test` as root installs Debian's postgresql package"
        )
    server = Postgres(bin_dir)
    yield server
    with contextlib.suppress(Exception):
        server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def pg_db(postgres, request) -> str:
    """A fresh database on the session's PostgreSQL for one test: its SQLAlchemy URL."""
    name = re.sub(r"\W+", "_", request.node.name.lower())[:40] + f"_{uuid.uuid4().hex[:6]}"
    return postgres.create_database(name)


def stop_group(proc: subprocess.Popen, grace: float = 5) -> None:
    """Stop a process started with ``start_new_session=True`` and all it started (a server's
    workers): SIGTERM to its process group, SIGKILL to whatever is left after ``grace`` seconds.
    Nothing waits on a timeout that fails: a loaded machine may take its time to stop a server."""
    for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a PostgreSQL backend store and a local artifact root."""

    def __init__(self, backend: str, artifacts: Path) -> None:
        self.backend, self.artifacts, self.port = backend, artifacts, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = artifacts.parent / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        cmd = [
            *(str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.backend),
            *("--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(self.port)),
            *("--workers", "1"),
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True
            )
        deadline = time.monotonic() + 120
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the whole server (uvicorn and its workers: it runs in its own session)."""
        if self.proc is not None:
            stop_group(self.proc)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """One MLflow tracking server for the session, its runs in PostgreSQL."""
    server = MlflowServer(postgres.create_database("mlflow"), tmp_path_factory.mktemp("mlflow-server") / "artifacts")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """One throwaway single-node SLURM cluster for the session (tests/slurm_cluster.py); skipped,
    with the reason and the daemons' logs, only when it cannot run here (not root, not installed)."""
    from tests.slurm_cluster import SlurmCluster, SlurmError

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmError as e:
        pytest.skip(f"no SLURM test cluster: {e}\n`make test` as root installs Debian's slurm-wlm and munge")
    yield cluster
    cluster.stop()
