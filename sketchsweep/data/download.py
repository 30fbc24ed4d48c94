"""Download Quick, Draw! class files from Google's public bucket, resumably.

``python -m sketchsweep.data.download --classes cat,dog | --all [--dest data/quickdraw]
[--format bitmap|simplified] [--base-url URL] [--retries N]`` writes ``<dest>/<name>.npy`` (or
``.ndjson``). Class names are checked against the 345 official categories before any network
access. Each file is written to ``<name>.npy.part`` and renamed only once its size matches what the
server announced, so a truncated file never sits under the final name; an interrupted or dropped
download resumes from the ``.part`` with an HTTP Range request.

Exit codes: 0 every file is there, 1 some failed (listed), 2 bad arguments or class names.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from sketchsweep import cli
from sketchsweep.data.categories import CATEGORIES, check_classes
from sketchsweep.data.errors import DataError

DEFAULT_BASE_URL = "https://storage.googleapis.com/quickdraw_dataset/full"
BASE_URL_ENV = "SKETCHSWEEP_QUICKDRAW_URL"
FORMATS = {"bitmap": ("numpy_bitmap", ".npy"), "simplified": ("simplified", ".ndjson")}
CHUNK = 1 << 16
USER_AGENT = "sketchsweep-download"


class DownloadError(RuntimeError):
    """A file could not be downloaded (not retried further). ``failed`` maps class -> reason."""

    def __init__(self, message: str, done: list[Path] | None = None, failed: dict[str, str] | None = None):
        super().__init__(message)
        self.done = done or []
        self.failed = failed or {}


class _Transient(Exception):
    """Worth another attempt: the next one resumes from the bytes already in the ``.part``."""


# http.client.HTTPException covers IncompleteRead; ConnectionError covers resets and RemoteDisconnected.
_RETRYABLE = (_Transient, ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError)


def file_url(base_url: str, name: str, fmt: str = "bitmap") -> str:
    """``traffic light`` -> ``<base>/numpy_bitmap/traffic%20light.npy``."""
    folder, ext = FORMATS[fmt]
    return f"{base_url.rstrip('/')}/{folder}/{urllib.parse.quote(name + ext)}"


class _Progress:
    """One file's progress on stderr: a tqdm bar on a terminal, else one line when it is done."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.moved = 0  # bytes received this run, over all attempts (for the MB/s figure)
        self.t0 = time.monotonic()

    def start(self, offset: int, total: int | None) -> None:
        if self.tty:
            try:
                from tqdm import tqdm  # only needed on a terminal
            except ImportError:  # a missing progress bar must not fail a download
                self.tty = False
                return
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=self.label, leave=True
            )

    def update(self, n: int) -> None:
        self.moved += n
        if self.bar is not None:
            self.bar.update(n)

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"{self.label}: {message}", file=sys.stderr)
        else:
            print(f"{self.label}: {message}", file=sys.stderr, flush=True)

    def finish(self, size: int) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            secs = max(time.monotonic() - self.t0, 1e-6)
            rate = self.moved / secs / 1e6
            print(
                f"{self.label}: {size:,} bytes ({self.moved:,} fetched in {secs:.1f} s, {rate:.2f} MB/s)",
                file=sys.stderr,
                flush=True,
            )


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 199, 200); ``bytes */200`` -> (None, None, 200); unknown parts None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    first, last, total = (None if g in (None, "*") else int(g) for g in m.groups())
    return first, last, total


def _http_error(url: str, e: urllib.error.HTTPError) -> Exception:
    if e.code == 404:
        return DownloadError(f"{url}: HTTP 404 Not Found (no such file; check the class name, --format and --base-url)")
    if e.code in (408, 429) or e.code >= 500:
        return _Transient(f"HTTP {e.code} {e.reason}")
    return DownloadError(f"{url}: HTTP {e.code} {e.reason}")


def _attempt(url: str, part: Path, timeout: float, progress: _Progress) -> None:
    """One request: append to (or restart) ``part``; return only once it holds the whole file."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:
                # Nothing left to send: fine if the .part already is the whole file, else it is bad.
                total = _content_range(e.headers.get("Content-Range"))[2]
                if total == offset:
                    return
                part.unlink()
                raise _Transient(
                    f"resume refused (HTTP 416; .part has {offset} bytes, file {total}); starting over"
                ) from None
            raise _http_error(url, e) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise DownloadError(f"{url}: {e.reason}") from None
        raise
    with resp:
        if resp.status == 206:
            first, last, total = _content_range(resp.headers.get("Content-Range"))
            if first != offset:
                part.unlink()
                raise _Transient(f"asked to resume at byte {offset}, server sent {first}; starting over")
            expected = total if total is not None else (last + 1 if last is not None else None)
            mode = "ab"
        elif resp.status == 200:
            if offset:
                progress.note(f"server ignored the Range request; starting over from byte 0 ({offset} discarded)")
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {resp.status} {resp.reason}")
        progress.start(offset, expected)
        size = offset
        with open(part, mode) as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                size += len(chunk)
                progress.update(len(chunk))
    # http.client returns a short body silently when the peer closes early: the size check is what catches it.
    if expected is not None and size < expected:
        raise _Transient(f"connection closed at {size:,} of {expected:,} bytes")
    if expected is not None and size > expected:
        part.unlink()
        raise _Transient(f"got {size:,} bytes, more than the {expected:,} announced; starting over")


def fetch(
    url: str,
    final: str | Path,
    retries: int = 5,
    progress: bool = True,
    *,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``final`` via ``final.part``, resuming and retrying transient failures."""
    final = Path(final)
    prog = _Progress(final.name, progress)
    if final.exists():
        prog.note("already there, skipped")
        return final
    part = final.with_name(final.name + ".part")
    try:
        for attempt in range(retries + 1):
            try:
                _attempt(url, part, timeout, prog)
                break
            except _RETRYABLE as e:
                reason = str(e) or type(e).__name__
                if attempt == retries:
                    raise DownloadError(f"{url}: gave up after {attempt + 1} attempt(s): {reason}") from None
                delay = backoff * 2**attempt
                have = part.stat().st_size if part.exists() else 0
                prog.note(f"{reason}; retry {attempt + 1}/{retries} in {delay:.3g} s from byte {have:,}")
                time.sleep(delay)
    except BaseException:
        if prog.bar is not None:
            prog.bar.close()
        raise
    os.replace(part, final)  # atomic: the final name only ever holds a complete file
    prog.finish(final.stat().st_size)
    return final


def download(
    classes: Iterable[str],
    dest: str | Path,
    fmt: str = "bitmap",
    base_url: str | None = None,
    retries: int = 5,
    progress: bool = True,
    *,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch each class to ``dest/<name>.npy`` (or ``.ndjson``); return the final paths.

    Names are validated first (``DataError``, before any request). ``base_url`` defaults to
    ``$SKETCHSWEEP_QUICKDRAW_URL``, else Google's bucket. Every class is tried; if any failed, one
    ``DownloadError`` lists them (its ``done`` and ``failed`` attributes say which).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {list(FORMATS)}, got {fmt!r}")
    names = check_classes(classes)
    base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ext = FORMATS[fmt][1]
    done: list[Path] = []
    failed: dict[str, str] = {}
    for name in names:
        try:
            done.append(
                fetch(
                    file_url(base_url, name, fmt),
                    dest / f"{name}{ext}",
                    retries,
                    progress,
                    backoff=backoff,
                    timeout=timeout,
                )
            )
        except DownloadError as e:
            failed[name] = str(e)
            if progress:
                print(f"failed: {e}", file=sys.stderr, flush=True)
    if failed:
        listed = "; ".join(f"{name!r}: {why}" for name, why in failed.items())
        raise DownloadError(f"{len(failed)} of {len(names)} file(s) failed: {listed}", done, failed)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sketchsweep.data.download",
        description="Download Quick, Draw! class files (resumable; a file appears only once complete).",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", help="comma-separated, e.g. 'cat,dog,traffic light' (_ may stand for a space)")
    which.add_argument("--all", action="store_true", help=f"all {len(CATEGORIES)} categories")
    p.add_argument("--dest", type=Path, default=Path("data/quickdraw"), help="folder to write (default: %(default)s)")
    p.add_argument("--format", dest="fmt", choices=list(FORMATS), default="bitmap", help="default: %(default)s")
    p.add_argument("--base-url", help=f"default: ${BASE_URL_ENV}, else {DEFAULT_BASE_URL}")
    p.add_argument("--retries", type=int, default=5, help="retries per file on transient errors (default: 5)")
    args = p.parse_args(argv)
    if args.retries < 0:
        p.error(f"--retries: expected 0 or more, got {args.retries}")
    names = list(CATEGORIES) if args.all else [n for n in args.classes.split(",") if n.strip()]
    try:
        names = check_classes(names)  # before any network access
    except DataError as e:
        return cli.fail(e)
    try:
        paths = download(names, args.dest, args.fmt, args.base_url, args.retries)
    except DownloadError as e:
        return cli.fail(e, cli.FAILURE)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return cli.INTERRUPTED
    print(f"done: {len(paths)} file(s) in {args.dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
