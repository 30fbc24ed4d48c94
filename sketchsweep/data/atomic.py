"""Writing data files and folders so that nothing is ever half-written or left behind.

They are built under a temporary name beside their destination and renamed into place; they get
the permissions the user's umask gives any new file (mkstemp/mkdtemp's are owner-only, so a
shared data folder or cache would be unreadable to others); and SIGTERM or Ctrl-C while they are
built stops at the next ``stop_points`` check, so the temporary ones are removed. The renames that
put the work in place are done with those signals held back (``StopPoints.finishing``), so none
can land between two of them: several files or folders change together or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sketchsweep.cli import held_signals

SIGNALS = {signal.SIGINT, signal.SIGTERM}
log = logging.getLogger("sketchsweep")


@contextlib.contextmanager
def temp_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new, empty folder ``parent/<prefix><random>`` with the umask's permissions, removed on
    exit unless renamed away. Created inside the ``try``, so a signal that lands just after the
    ``mkdir`` still removes it (64 random bits: the name is never someone else's)."""
    path = parent / f"{prefix}{secrets.token_hex(8)}"
    try:
        os.mkdir(path, 0o777)  # the umask applies, as to any folder the user makes
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _temp_name(dst: Path) -> Path:
    return dst.parent / f".{dst.name}-{secrets.token_hex(8)}.tmp"


def _write_npy(arr: np.ndarray, path: Path, mode: int | None) -> None:
    """``np.save`` to the new file ``path``, flushed to disk; removed if that fails."""
    try:
        with open(path, "xb") as f:  # O_EXCL, mode 0666 less the umask
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(path, mode)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class Staged:
    """``.npy`` files written under temporary names beside their destinations (``save_npy``, with
    the permission bits ``mode``, else the umask's), then all renamed into place at once
    (``replace_all``); ``staged()`` removes whatever is left."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def save_npy(self, arr: np.ndarray, dst: Path, mode: int | None = None) -> None:
        tmp = _temp_name(dst)
        self.pairs.append((tmp, dst))  # first: a signal cannot leave a file the caller does not know of
        _write_npy(arr, tmp, mode)

    def replace_all(self) -> None:
        """Rename every file into place, or (an error) none: the destinations replaced before a rename
        failed get their old content back, from hard links made first (new ones are removed). Call
        it inside ``StopPoints.finishing`` so no signal lands between two renames."""
        existed = {dst for _, dst in self.pairs if dst.exists()}
        backups: dict[Path, Path] = {}
        done: list[Path] = []
        try:
            for dst in sorted(existed):
                with contextlib.suppress(OSError):  # no hard links here (or an immutable file): no way back
                    os.link(dst, backup := dst.parent / f".{dst.name}-{secrets.token_hex(8)}.old")
                    backups[dst] = backup
            for tmp, dst in self.pairs:
                os.replace(tmp, dst)
                done.append(dst)
        except OSError as e:
            changed = [d for d in reversed(done) if not _put_back(d, backups.pop(d, None), d in existed)]
            kept = (
                f"{', '.join(map(str, changed))} could not be put back as they were"
                if changed
                else "no file was changed"
            )
            raise OSError(f"{self.pairs[len(done)][1]}: cannot be replaced ({e.strerror or e}); {kept}") from None
        finally:
            for backup in backups.values():
                backup.unlink(missing_ok=True)


def _put_back(dst: Path, backup: Path | None, existed: bool) -> bool:
    """Undo a rename onto ``dst``: its old content from ``backup``, or no file if there was none."""
    if not existed:
        dst.unlink(missing_ok=True)
    elif backup is None:
        return False
    else:
        os.replace(backup, dst)
    return True


@contextlib.contextmanager
def staged() -> Iterator[Staged]:
    files = Staged()
    try:
        yield files
    finally:
        for tmp, _ in files.pairs:
            tmp.unlink(missing_ok=True)


class StopPoints:
    """What ``stop_points`` yields: call it between steps; do the renames that complete the work
    inside ``finishing()``."""

    def __init__(self, check: Callable[[], None] | None = None) -> None:
        self._check = check  # None: someone else's handlers are in charge of the signals

    def __call__(self) -> None:
        if self._check is not None:
            self._check()

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        """Around the renames that complete the work: a SIGINT or SIGTERM that comes meanwhile is
        only noted, so none lands between two renames, then sent again once they are done (or have
        failed). Done, the work is complete and ours no longer stops it: it is reported and the
        command ends normally (stopped, it would look as if nothing had changed, and a rerun of
        ``--append`` would append twice); someone else's handlers get it as usual.

        Handlers, not ``pthread_sigmask``: that blocks signals for this thread only, and the kernel
        then hands them to another one (NumPy's BLAS threads), whose C handler trips Python's."""
        self()  # one that came before still stops the work: nothing is renamed yet
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread handles signals: nothing can land here
            return
        came: list[int] = []
        # (None: a handler not set from Python, which cannot be set back; the default is the closest)
        before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) or signal.SIG_DFL for s in SIGNALS}
        after = before
        try:
            yield
            if self._check is not None:  # ours, until stop_points ends (held_signals restores them)
                after = dict.fromkeys(SIGNALS, _work_complete)
        finally:
            for s, handler in after.items():
                signal.signal(s, handler)
            for s in came:
                os.kill(os.getpid(), s)


def _work_complete(signum, frame) -> None:
    log.warning("signal %d: came as the finished files were renamed into place; they all are", signum)


@contextlib.contextmanager
def stop_points() -> Iterator[StopPoints]:
    """While temporary files are built: SIGTERM (``kill``) and Ctrl-C are held (``cli.held_signals``)
    and calling what this yields raises ``KeyboardInterrupt`` at the next call, so ``finally``
    blocks remove them (SIGTERM's default action ends the process without running any, and an
    exception raised from a handler in the middle of NumPy code can be lost). Handlers someone else
    installed (training's) are left alone; the call then passes."""
    if (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        or threading.current_thread() is not threading.main_thread()
    ):
        yield StopPoints()
        return
    with held_signals() as signals:
        yield StopPoints(signals.check)


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (``flock`` on the folder itself, so no lock file is left
    behind): a second writer waits until the first has finished."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
