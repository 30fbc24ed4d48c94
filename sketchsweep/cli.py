"""What every command shares: exit codes, errors as one line with secrets masked, and Ctrl-C /
SIGTERM held back while a write is in progress.

Standard library only: ``predict`` with an ``.onnx`` model must not pay for torch or MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

BAD_INPUT = 2  # a file, key, argument or model reference is wrong; the message names it and what was expected
FAILURE = 1  # the input was fine but the work failed (a parity check, a health check, an unreadable drawing)
INTERRUPTED = 130  # Ctrl-C or SIGTERM

log = logging.getLogger("sketchsweep")


class UserError(ValueError):
    """Bad input: a file, key, argument or model reference that cannot be used. Every such error
    derives from this one, so each command maps it to ``BAD_INPUT`` the same way; its message names
    what is wrong and what was expected."""


def redact(text: str) -> str:
    """Hide passwords in URLs: ``postgresql://user:secret@host`` -> ``postgresql://user:***@host``."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]*@", r"\1:***@", text)


def one_line(e: BaseException, limit: int = 300) -> str:
    """A library's exception as ``Type: first line``, shortened: database drivers and exporters put
    pages of SQL, links and tracebacks in theirs."""
    text = " ".join((str(e).strip().splitlines() or [""])[0].split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return redact(f"{type(e).__name__}: {text}" if text else type(e).__name__)


def message(error: BaseException | str) -> str:
    """An error as one line, secrets masked. An exception's own message is kept whole (ours name the
    file or key), with its cause when the message does not already say it."""
    if isinstance(error, BaseException):
        cause = error.__cause__
        error = f"{error}: {cause}" if cause is not None and str(cause) not in str(error) else str(error)
    return redact(" ".join(error.split()))


def fail(error: BaseException | str, code: int = BAD_INPUT) -> int:
    """Print ``error: <message>`` on stderr and return ``code`` for ``main`` to return."""
    print(f"error: {message(error)}", file=sys.stderr)
    return code


def check_folder(folder: Path) -> None:
    """Fail, naming the culprit, when a file stands where ``folder`` or one of its parents should
    be: mkdir's "File exists" / "Not a directory" do not say which path is the file."""
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"{p} is a file, not a folder: cannot hold {folder}")


class Signals:
    """SIGTERM (kill, SLURM preemption) and Ctrl-C end a run as a ``KeyboardInterrupt``, but only
    where that is safe: at once during compute (``interruptible()``), otherwise once the write in
    progress is done (``check()``). An interrupt inside MLflow's SQLite writes would leave the store
    locked, so the run could not even be marked KILLED. A second signal stops at once."""

    def __init__(self) -> None:
        self.open, self.pending = False, None

    def handle(self, signum, frame) -> None:
        if self.open or self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt(f"signal {signum}")
        self.pending = signum
        log.warning("signal %d: stopping after the checkpoint and log writes in progress (again: stop now)", signum)

    def check(self) -> None:
        """Raise the ``KeyboardInterrupt`` a signal held back during writes."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self.open = True
        try:
            yield
        finally:
            self.open = False


@contextlib.contextmanager
def held_signals() -> Iterator[Signals]:
    """Route SIGTERM and SIGINT through a ``Signals`` for the duration (main thread only)."""
    signals = Signals()
    try:
        old = {s: signal.signal(s, signals.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        signals.open = True
        yield signals
        return
    try:
        yield signals
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    signals.check()  # held through the last writes: it still stops whatever comes next


@contextlib.contextmanager
def progress_bar(n_images: int, batch_size: int, desc: str) -> Iterator[Callable[[], object] | None]:
    """A tqdm bar when stderr is a terminal; nothing otherwise (CI and SLURM logs get one
    line per epoch instead of thousands of carriage returns)."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # only on a terminal

    with tqdm(total=math.ceil(n_images / batch_size), desc=desc, unit="batch", leave=False) as bar:
        yield bar.update
