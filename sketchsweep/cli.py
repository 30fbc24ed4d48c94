"""What every command shares: exit codes, errors as one line with secrets masked, and Ctrl-C /
SIGTERM held back while a write is in progress.

Standard library only: ``predict`` with an ``.onnx`` model must not pay for torch or MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

BAD_INPUT = 2  # a file, key, argument or model reference is wrong; the message names it and what was expected
FAILURE = 1  # the input was fine but the work failed (a parity check, a health check, an unreadable drawing)
INTERRUPTED = 130  # Ctrl-C or SIGTERM

log = logging.getLogger("sketchsweep")


class UserError(ValueError):
    """Bad input: a file, key, argument or model reference that cannot be used. Every such error
    derives from this one, so each command maps it to ``BAD_INPUT`` the same way; its message names
    what is wrong and what was expected."""


HIDDEN = "***"  # what a password is replaced with
# Query parameters that carry a password (libpq's password, sslpassword; PyMySQL's passwd; ...).
PASSWORD_KEY = re.compile(r"\w*(?:password|passwd|pwd)|pass", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(rf"([?&](?:{PASSWORD_KEY.pattern})=)[^&\s'\"]+", re.IGNORECASE)
# scheme://user:rest@: the user name as SQLAlchemy reads it (no ":" or "/"); rest runs to the
# word's last "@" before another URL, and _hide_userinfo decides how much of it is the password.
# A "\" may stand before a ":" (Hydra's overrides escape it: mlflow.tracking_uri=http\://u\:pw@h).
_USERINFO = re.compile(r"\b([A-Za-z][\w+.-]*\\?://[^:/\s]*):((?:(?!://)\S)*@)")


def _hide_userinfo(m: re.Match) -> str:
    head, rest = m.groups()
    if head.replace("\\", "").lower().startswith(("http://", "https://")):  # urllib: the authority ends at "/?#"
        authority = re.match(r"[^/?#]*", rest).group()
        if "@" in authority:
            return f"{head}:{HIDDEN}{rest[authority.rindex('@') :]}"
        if is_host_port(f"{head.split('://', 1)[1]}:{authority}".replace("\\", "")):
            return m.group()  # host:port, then an "@" in the path: no user info
        # Not a host:port: a "/" in the password cut it; read as SQLAlchemy reads it.
    first = rest.index("@")  # SQLAlchemy: the password runs to the first "@", and one in the host
    host = re.match(r"\[?[^/:?]*", rest[first + 1 :]).group()  # is the password's (unencoded)
    end = first + 1 + host.rindex("@") if "@" in host else first
    return f"{head}:{HIDDEN}{rest[end:]}"


def is_host_port(authority: str) -> bool:
    """Whether urllib reads ``authority`` (a URL's part between ``//`` and the path) as a host
    with a port that is a number, or none."""
    try:
        return isinstance(urlsplit(f"//{authority}").port, int | None)
    except ValueError:  # a port that is no number, an IPv6 host without its "]"
        return False


def redact(text: str) -> str:
    """``text`` with the passwords of the URLs in it hidden (``postgresql://user:***@host``,
    ``...?password=***``), by regular expressions only: the standard-library fallback of
    ``sketchsweep.credentials.hide_passwords`` (SQLAlchemy's parser), which says which is used where."""
    return _QUERY_PASSWORD.sub(rf"\1{HIDDEN}", _USERINFO.sub(_hide_userinfo, text))


def one_line(e: BaseException, limit: int = 300) -> str:
    """A library's exception as ``Type: first line``, shortened: database drivers and exporters put
    pages of SQL, links and tracebacks in theirs."""
    text = redact(" ".join((str(e).strip().splitlines() or [""])[0].split()))  # before a cut splits a URL
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
        self.open, self.pending, self.done = False, None, False

    def handle(self, signum, frame) -> None:
        if self.open or self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt(f"signal {signum}")
        self.pending = signum
        if not self.done:
            log.warning("signal %d: stopping once the writes in progress are done (again: stop now)", signum)

    def settle(self) -> None:
        """The work is complete: a signal from here on no longer cuts it. ``held_signals`` then
        leaves it in ``pending`` for the caller to report, instead of raising it."""
        self.done = True

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


def hand_back(signum: int) -> None:
    """Pass on a signal that came when the work was complete (``Signals.settle``) to the
    ``held_signals`` around this one, if any (a sweep's): it stops there at its next check."""
    owner = getattr(signal.getsignal(signum), "__self__", None)
    if isinstance(owner, Signals) and owner.pending is None:
        owner.pending = signum


def stop_on_sigterm_in_a_job() -> None:
    """A submitit job ignores SIGTERM (submitit's ``bypass``: it waits for USR2 to requeue itself):
    a trial's job stops on it as on Ctrl-C instead, from its first line, so ``scancel`` or a
    stopped sweep ends it while it sets up too (training then holds signals through its writes)."""
    handler = signal.getsignal(signal.SIGTERM)
    if os.environ.get("SUBMITIT_EXECUTOR") and getattr(handler, "__name__", "") == "bypass" and _main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def held_signals() -> Iterator[Signals]:
    """Route SIGTERM and SIGINT through a ``Signals`` for the duration (main thread only).

    Nested in another's (a job run in the sweep's process): a signal the outer one holds stops
    the job before it starts, and once the job is over the outer one holds signals rather than
    raising them, so a job's way back into the sweep (Hydra's bookkeeping) is not cut after its
    trial was recorded; the sweep stops at its next check."""
    outer = getattr(signal.getsignal(signal.SIGTERM), "__self__", None) if _main_thread() else None
    if isinstance(outer, Signals):
        outer.check()
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
        if isinstance(outer, Signals):
            outer.open = False  # before its handler is back: no moment where a signal cuts the way back
        for s, handler in old.items():
            signal.signal(s, handler)
    if not signals.done:
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


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Run a command's ``main`` and end the process without the interpreter's teardown, which
    frees torch, MLflow and ONNX module by module for 1-2.5 s that nobody waits for. Everything
    that finishes a process still runs first: thread pools are shut down and other threads joined,
    then the atexit handlers
    (logging's flush, MLflow's, temporary folders'), then the output is flushed. An exception
    other than ``SystemExit`` ends the process the usual way, with its traceback."""
    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # sys.exit("message") prints it and exits 1, as Python does
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    # As Python's own exit does: the threading atexit hooks (thread pools' shutdown), then joining
    # the other non-daemon threads; then the atexit handlers.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
