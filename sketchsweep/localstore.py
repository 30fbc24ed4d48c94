"""A local MLflow store's folders, checked before a run starts: the SQLite store's folder and the
artifact folder must take new files (else training would end in a traceback after its last epoch,
or MLflow would retry for minutes), and a fresh SQLite store is created by one process at a time.

Standard library only, but for MLflow's schema version (read where a lock may be needed)."""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from sketchsweep.cli import check_folder


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute); None for other stores."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def local_folder(location: str | None) -> Path | None:
    """The folder an artifact location names on this machine: a ``file:`` URI or a plain path.
    None for remote artifact stores (a server, object storage), which are not checked here."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(location) if parsed.scheme == "" else None


def write_problem(folder: Path) -> str | None:
    """None when files can be created in ``folder`` (made if missing), else why not. Tried rather
    than asked: root passes every permission check, but not an immutable or read-only folder."""
    try:
        check_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sketchsweep-write-test-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def artifact_problem(location: str | None, artifact_root: str | None, experiment: str, created: bool) -> str | None:
    """What is wrong with a local artifact location that cannot take files, as the error a run
    must stop with before training (otherwise it finds out after its last epoch); None when it can,
    or when the artifacts go to a remote store (not checked). ``created``: the experiment exists
    and keeps the location it was created with."""
    folder = local_folder(location)
    if folder is None or (problem := write_problem(folder)) is None:
        return None
    key = (
        f"mlflow.artifact_root={artifact_root}" if artifact_root else "mlflow.artifact_root (not set: beside the store)"
    )
    whose = (
        f"the folder experiment '{experiment}' was created with"
        if created
        else f"the artifact folder of experiment '{experiment}'"
    )
    return f"{key}: cannot create files in {folder} ({problem}), {whose}; expected a folder this user can write" + (
        " (or another mlflow.experiment_name)" if created else ""
    )


@contextlib.contextmanager
def creation_lock(uri: str) -> Iterator[None]:
    """Hold this while opening a SQLite store for the first time in a process. MLflow creates and
    migrates an empty database on first contact, and two processes doing so at once collide
    (``duplicate column name: step``): a file lock beside the database lets one create it while the
    other waits. A database already at MLflow's schema needs no lock and gets no lock file."""
    db = sqlite_file(uri)
    if db is None or _current(db):
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if the process dies
        yield


def _current(db: Path) -> bool:
    """Whether ``db`` is an MLflow database at this MLflow's schema (nothing left to create or
    migrate), read without writing; anything in doubt counts as not (the lock is then taken)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as c:
            row = c.execute("SELECT version_num FROM alembic_version").fetchone()
        return row is not None and row[0] == _get_latest_schema_revision()
    except Exception:
        return False
