"""Where a study lives: a journal file (one sweep process, which owns the study through a lock
beside the journal; the default, under ``mlruns/optuna/``) or a database (several workers, with
heartbeats so a dead worker's trial is taken over); and the doctor's check that a storage opens
(a throwaway study created, used and deleted)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial

from sketchsweep.cli import UserError, check_folder, redact
from sketchsweep.paths import JOURNAL_DIR

log = logging.getLogger("sketchsweep.sweeper")


class StorageError(UserError):
    """A storage URL that cannot be used: a missing driver or a database that cannot be reached."""


class StudyBusy(UserError):
    """A journal study that another sweep process owns."""


def storage_url(spec: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (the ``[postgres]`` extra), not
    SQLAlchemy's default psycopg2; any other URL is kept as given."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", spec)


def is_database(spec: str) -> bool:
    """A database URL (several workers may share its studies), not a journal file path."""
    return "://" in spec


def is_sqlite(spec: str) -> bool:
    """An SQLite URL (``sqlite:///...``, ``sqlite+pysqlite:///...``), not a path that starts so."""
    return is_database(spec) and spec.lower().split("://")[0].split("+")[0] == "sqlite"


def check_parallel(spec: str, n_jobs: int, remote: bool) -> None:
    """Refuse a storage that cannot take the sweep's jobs: SQLite with several at once (its
    writers lock each other out) or on other machines (its locks fail on network file systems), a
    journal in a folder that cannot hold Optuna's file lock (a symlink), or, with jobs on other
    machines (``remote``: SLURM), in memory (tmpfs) on this one."""
    shown, n = redact(spec), f"hydra.sweeper.n_jobs={n_jobs}"
    if is_sqlite(spec) and (n_jobs > 1 or remote):
        where = "jobs on other machines (SLURM)" if remote else f"{n} trials at once"
        raise UserError(
            f"hydra.sweeper.storage={shown}: SQLite is not safe for {where}; expected a .journal "
            "file (one machine) or postgresql+psycopg://user@host/db (several machines)"
        )
    if is_database(spec):
        return
    folder = Path(spec).expanduser().absolute().parent
    if remote and (kind := _file_system(folder)) in ("tmpfs", "ramfs"):
        raise UserError(
            f"hydra.sweeper.storage={shown}: {folder} is in memory ({kind}) on this machine, where the jobs "
            "on other nodes cannot see it; expected a journal on a file system every node mounts, or a "
            "postgresql+psycopg:// URL"
        )
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".sketchsweep-lock-check-{os.getpid()}"
    try:
        os.symlink(spec, probe)
    except OSError as e:
        raise UserError(
            f"hydra.sweeper.storage={shown}: the folder {folder} cannot hold the journal's lock (a symlink: "
            f"{e.strerror}); expected a journal on a local or NFS file system, or a postgresql+psycopg:// URL"
        ) from None
    probe.unlink()


def _file_system(folder: Path) -> str:
    """The type of the file system that holds ``folder`` (/proc/mounts; "" where there is none)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    folder = folder.resolve()
    found = [(Path(point), kind) for point, kind in mounts if folder.is_relative_to(point)]
    return max(found, key=lambda m: len(m[0].parts))[1] if found else ""


def owner_path(journal: str, study_name: str) -> Path:
    """The lock file of a journal study, beside the journal (not ``<journal>.lock``: Optuna's own
    short write lock has that name). One per study, so studies sharing a journal do not block each other."""
    path, safe = Path(journal).expanduser(), re.sub(r"[^\w.-]+", "_", study_name)
    return path.with_name(f"{path.name}.{safe}.owner")


def _owner(fd: int) -> str | None:
    """Who the lock file names (``pid N on this host`` / ``on host H``); None when it names no one."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (ValueError, TypeError, KeyError):
        return None
    return f"pid {pid} on " + ("this host" if host == socket.gethostname() else f"host {host}")


@contextlib.contextmanager
def journal_owner(journal: str, study_name: str) -> Iterator[Path]:
    """Own a journal study while the sweep runs: a second sweep process on it would fail the first
    one's running trial and run trials twice. An OS lock (flock) on ``owner_path``, so a sweep that
    dies, even by SIGKILL, frees it; the file names the owner (host and pid) for the messages.
    Raises ``StudyBusy`` when another process owns the study."""
    path = owner_path(journal, study_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyBusy(
                f"study {study_name} in {journal} is being swept by another process: {_owner(fd) or 'a sweep'} "
                f"holds {path}. A journal study takes one sweep process at a time: wait for that one to end, or "
                "run several workers on a database storage, e.g. "
                "hydra.sweeper.storage=postgresql+psycopg://user@host/optuna (README: Scaling out)"
            ) from None
        except OSError as e:  # a file system without flock (some network mounts): run, but say so
            log.warning("study %s: cannot lock %s (%s): a second sweep on it would not be refused", study_name, path, e)
        else:
            if previous := _owner(fd):
                log.warning(
                    "study %s: taking over %s from %s, a sweep that ended without releasing it",
                    study_name,
                    path,
                    previous,
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: no owner to name (a killed sweep leaves its name, and no lock)
    finally:
        os.close(fd)  # closing drops the flock


# Jobs in one process share one engine (connection pool) per URL instead of one per trial.
_JOB_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def open_storage(
    spec: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """A storage for ``hydra.sweeper.storage``: a database URL becomes an ``RDBStorage`` (with
    Optuna's heartbeat when ``heartbeat_interval`` is given); a file path becomes a JournalStorage
    file, which is safe for several processes on one machine but has no heartbeat."""
    if not is_database(spec):
        path = Path(spec).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    url = storage_url(spec)
    shared = heartbeat_interval is None and on_stale is None
    if shared and url in _JOB_STORAGES:
        return _JOB_STORAGES[url]
    if url.startswith("postgresql+psycopg:"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StorageError(
                f"hydra.sweeper.storage={redact(spec)}: PostgreSQL needs psycopg 3, which is not installed; "
                "expected `pip install 'sketchsweep[postgres]'` (or psycopg[binary])"
            ) from None
    storage = _rdb_storage(spec, url, heartbeat_interval, grace_period, on_stale)
    if shared:
        _JOB_STORAGES[url] = storage
    return storage


def _rdb_storage(spec, url, heartbeat_interval, grace_period, on_stale) -> optuna.storages.RDBStorage:
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    # pre_ping: a connection the database dropped (a restart) is replaced, not failed on.
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=on_stale,
                )
        except sqlalchemy.exc.SQLAlchemyError as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            if "connect" in reason.lower():
                raise StorageError(
                    f"hydra.sweeper.storage={redact(spec)}: cannot connect to the database ({redact(reason)}); "
                    "expected a reachable server and an existing database, e.g. postgresql+psycopg://user@host:5432/optuna"
                ) from None
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)  # workers starting together on a new database race to create Optuna's tables
    raise AssertionError("unreachable")


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage's id of trial ``number`` (heartbeats and ``Trial`` objects need it). Optuna has no
    public API for it: this is the one place that reaches into the study's private storage, and
    tests/test_sweep.py fails if that changes."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def fail_stale(study: optuna.Study) -> None:
    """Optuna's own stale-trial check (what ``Study.optimize`` runs before each trial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class Heartbeat:
    """Record the heartbeat of running trials every ``interval`` seconds from a thread of this
    process, which (with Hydra's basic launcher) is the one training them: if it dies, they stop
    beating and another worker fails and re-queues them. A missed beat (database briefly
    unreachable) is logged, not raised."""

    def __init__(self, storage, trial_ids: Callable[[], list[int]], interval: int) -> None:
        self.storage, self.trial_ids, self.interval = storage, trial_ids, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        if self.storage is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            for tid in self.trial_ids():
                try:
                    self.storage.record_heartbeat(tid)
                except Exception as e:
                    log.warning("heartbeat of trial id %d not recorded: %s", tid, redact(str(e)))


def check_storage(spec: str | None) -> str:
    """Create, use and delete a throwaway study in ``hydra.sweeper.storage`` (None: the default
    journal folder); returns what was checked, raises what went wrong."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec is not None and is_database(spec):
        return _check_rdb(spec)
    return _check_journal(Path(spec).expanduser() if spec else None)


def _study_roundtrip(storage: optuna.storages.BaseStorage) -> None:
    name = f"sketchsweep-doctor-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage)
    try:
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, 1.0)
        if study.best_value != 1.0:
            raise RuntimeError("a trial written could not be read back")
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def _check_journal(path: Path | None) -> str:
    """A journal file is append-only: the check writes a throwaway journal beside it (then deletes
    it) and only reads the configured file, so the user's studies are left exactly as they were."""
    folder = path.parent if path is not None else JOURNAL_DIR
    check_folder(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    scratch = folder / f".sketchsweep-doctor-{os.getpid()}.journal"
    try:
        _study_roundtrip(open_storage(str(scratch)))
    except OSError as e:
        raise OSError(f"cannot write a journal in {folder}: {e.strerror or e}") from None
    finally:
        for p in folder.glob(scratch.name + "*"):  # the journal and its lock file
            p.unlink(missing_ok=True)
        for p in created:  # folders this check made, innermost first
            try:
                p.rmdir()
            except OSError:
                break
    if path is not None and path.is_file():
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        studies = optuna.get_all_study_names(storage)
        return f"{path}: opens, {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}; its folder is writable"
    if path is not None:
        return f"{path} does not exist yet; its folder is writable, the first sweep creates it"
    return f"{folder}: writable; a throwaway study was created, used and deleted"


def _check_rdb(url: str) -> str:
    url = storage_url(url)  # as the sweeper reads it: postgres(ql):// means psycopg 3
    scheme = url.split("://", 1)[0]
    kwargs: dict = {}
    if scheme.startswith(("postgresql", "mysql")):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}  # a dead server fails in seconds
    # A SQLite file this check creates is removed again: the first sweep makes its own.
    sqlite_file = Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None
    new_file = sqlite_file is not None and not sqlite_file.exists()
    try:
        try:
            storage = optuna.storages.RDBStorage(url, **kwargs)
        except ImportError as e:
            hint = ""
            if scheme.startswith("postgresql"):
                hint = (
                    "; pip install 'psycopg[binary]' for postgresql+psycopg:// (and postgresql:// with "
                    "SQLAlchemy 2.1), or psycopg2-binary for postgresql+psycopg2://"
                )
            raise ImportError(f"the database driver for {scheme}:// is not installed ({e}){hint}") from None
        _study_roundtrip(storage)
        engine = getattr(storage, "engine", None)
        if engine is not None:  # close SQLite's connections before the file is removed
            engine.dispose()
    finally:
        if new_file and sqlite_file is not None:
            sqlite_file.unlink(missing_ok=True)
    return f"{scheme}:// storage opens; a throwaway study was created, used and deleted"
