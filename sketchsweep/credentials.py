"""Passwords in URLs (a database storage, a tracking server): hidden wherever a URL is shown,
written or logged, and handed to a sweep's jobs through the environment, never through their
overrides (Hydra and MLflow record those).

Which masking is used where:

- ``hide_password`` (one URL) and ``hide_passwords`` (every URL in a text): the parsers decide
  what the password is: urllib for ``http(s)://`` (the authority ends at the first ``/``, ``?``
  or ``#``, so an ``@`` in a path is no user info), SQLAlchemy's ``make_url`` for the rest (and
  for an http URL whose authority is no host:port, which a ``/`` in the password cuts short);
  password query parameters (``?password=``, ``sslpassword``, ``passwd``) too. What a run
  records goes through them: ``scrub`` (config.yaml, the params, the checkpoint), the
  ``hydra.overrides`` tag, ``scrub_files`` (``.hydra/*.yaml``, ``multirun.yaml``), ``share``.
- ``cli.redact`` (standard library only, so ``predict`` with ONNX stays light): regular
  expressions that read URLs the same way, for messages and log lines (``cli.message``,
  ``cli.one_line``, the modules' log calls and error tags) and here for a URL neither parser
  reads. It ends a URL at white space, so only the parsers hide a password holding a space.
  tests/test_secrets.py checks that both agree on every other URL it tries.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from yaml import YAMLError

from sketchsweep.cli import HIDDEN, PASSWORD_KEY, is_host_port, redact

log = logging.getLogger("sketchsweep")

# The real URLs behind a sweep's hidden ones, as a JSON list: the sweeper sets it, its launcher's
# jobs inherit it (in-process, joblib and submitit alike), and it is never logged.
SECRET_URLS_ENV = "SKETCHSWEEP_SECRET_URLS"

Span = tuple[int, int]
_URL_START = re.compile(r"(?<![\w+.-])[A-Za-z][\w+.-]*\\?://")
# What Hydra's override grammar escapes in a value: mlflow.tracking_uri=http\://alice\:pw@host\:5000
_ESCAPED = re.compile(r"\\([\\()\[\]{}:=, \t])")
_QUERY_PAIR = re.compile(r"[?&](?P<key>[^=&]*)=(?P<value>[^&]*)")
_WORD = re.compile(r"\S*")
_AUTHORITY_END = re.compile(r"[/?#]|$")
_TRAILING = ".,;:!?)]}>'\""  # after a URL in prose, not part of it


def _find(text: str, sub: str, start: int, stop: int) -> int:
    """Where ``sub`` is in ``text[start:stop]``, else ``stop``."""
    found = text.find(sub, start, stop)
    return stop if found < 0 else found


def _userinfo(url: str) -> tuple[Span | None, int, int]:
    """The span of the password in ``url``'s user info (None: none), and where its query may
    start and ends. ArgumentError or ValueError: not a URL urllib or SQLAlchemy reads."""
    begin = url.index("://") + 3
    if url[:begin].lower() in ("http://", "https://"):
        end = _AUTHORITY_END.search(url, begin).start()
        authority, query_end = url[begin:end], _find(url, "#", end, len(url))
        if "@" in authority:
            info = authority.rpartition("@")[0]
            colon = info.find(":")
            return (None if colon < 0 else (begin + colon + 1, begin + len(info))), end, query_end
        if is_host_port(authority):
            return None, end, query_end
    parsed = make_url(url)  # the password runs to the first "@"; one in the host is the password's
    if parsed.password is None:
        return None, begin, len(url)
    start = url.index(":", begin) + 1
    at = url.index("@", start)
    host = parsed.host or ""
    if "@" in host:
        at += 1 + (url[at + 1 : at + 2] == "[") + host.rindex("@")
    return (start, at), at, len(url)


def _spans(url: str) -> list[Span] | None:
    """Where ``url``'s passwords are (its user info's, password query parameters); None when it is
    no URL urllib or SQLAlchemy reads. Escapes of a Hydra override are read as what they stand for."""
    if _ESCAPED.search(url):
        plain, where = _unescape(url)
        spans = _spans(plain)
        return None if spans is None else [(where[a], where[b]) for a, b in spans]
    try:
        password, after, query_end = _userinfo(url)
    except (ArgumentError, ValueError):  # not a URL (a journal path), or a port that is no number
        return None
    spans = [password] if password else []
    if (query := url.find("?", after, query_end)) >= 0:
        for m in _QUERY_PAIR.finditer(url, query, query_end):
            if m["value"] and PASSWORD_KEY.fullmatch(unquote_plus(m["key"])):
                spans.append(m.span("value"))
    return spans


def _unescape(text: str) -> tuple[str, list[int]]:
    """``text`` without Hydra's escapes, and where each of its characters (and its end) is in ``text``."""
    plain, where, done = [], [], 0
    for m in _ESCAPED.finditer(text):
        plain.append(text[done : m.start()])
        where += [*range(done, m.start()), m.start()]
        plain.append(m[1])
        done = m.end()
    plain.append(text[done:])
    where += [*range(done, len(text) + 1)]
    return "".join(plain), where


def _mask(text: str, spans: list[Span]) -> str:
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + HIDDEN + text[end:]
    return text


def hide_password(url: str) -> str:
    """``url`` with its passwords shown as ``***``: ``postgresql://user:***@host/db`` (the user name
    stays: it tells which account), ``...?password=***``; the rest as given."""
    spans = _spans(url)
    return redact(url) if spans is None else _mask(url, spans)


def _word_end(text: str, start: int, stop: int) -> int:
    """Where the word from ``text[start]`` ends (white space; prose's closing marks are not in it)."""
    return start + len(_WORD.match(text, start, stop).group().rstrip(_TRAILING))


def _url_at(text: str, start: int) -> tuple[int, list[Span] | None]:
    """The end of the URL that starts at ``text[start]`` and its password spans (from ``start``).
    It ends at the closing quote when quoted, otherwise at white space, unless only the rest of the
    line parses and reads a password across that space: then at the white space after it. Never
    beyond the line or the next URL (``key=url,key=url``: Hydra's ``override_dirname``)."""
    stop = _find(text, "\n", start, len(text))
    if nxt := _URL_START.search(text, text.index("://", start) + 3, stop):
        stop = nxt.start()
    quote = text[start - 1] if start and text[start - 1] in "'\"" else ""
    if quote:
        end = _find(text, quote, start, stop)
        return end, _spans(text[start:end])
    end = _word_end(text, start, stop)
    spans = _spans(text[start:end])
    if spans is None and (wider := _spans(text[start:stop])) and wider[0][0] <= end - start < wider[0][1]:
        end = _word_end(text, start + wider[0][1], stop)  # the rest of the line is not this URL's
        spans = _spans(text[start:end])
    return end, spans


def hide_passwords(text: str) -> str:
    """``text`` with the passwords of every URL in it hidden, each URL read by ``hide_password``'s
    parsers (``cli.redact`` for one they do not read); the rest as given."""
    out, done = [], 0
    for m in _URL_START.finditer(text):
        if m.start() < done:
            continue  # inside the URL just read
        end, spans = _url_at(text, m.start())
        url = text[m.start() : end]
        out += [text[done : m.start()], redact(url) if spans is None else _mask(url, spans)]
        done = end
    return "".join([*out, text[done:]])


def _is_hidden(url: str) -> bool:
    return any(url[a:b] == HIDDEN for a, b in _spans(url) or [])


def _shared() -> list[str]:
    try:
        urls = json.loads(os.environ.get(SECRET_URLS_ENV) or "[]")
    except json.JSONDecodeError:
        return []
    return [u for u in urls if isinstance(u, str)] if isinstance(urls, list) else []


def share(url: str) -> str:
    """``url`` as a job's override may show it (password hidden); the real one goes to the jobs
    this process launches through ``$SKETCHSWEEP_SECRET_URLS`` (``reveal`` finds it there)."""
    shown = hide_password(url)
    if shown != url and url not in (known := _shared()):
        os.environ[SECRET_URLS_ENV] = json.dumps([*known, url])
    return shown


def reveal(url: str, key: str) -> str:
    """The real URL behind ``url`` when its password is hidden: the one the launching sweep shared.
    Without it, the URL without a password, so the driver's own channel is used (libpq reads
    ``PGPASSWORD`` or ``~/.pgpass``) rather than the literal ``***``."""
    if not _is_hidden(url):
        return url
    shown = hide_password(url)
    for real in reversed(_shared()):
        if hide_password(real) == shown:
            return real
    log.warning(
        "%s=%s: the password is hidden and $%s holds no such URL (set by the sweep that launches a job); "
        "connecting without it (PostgreSQL: PGPASSWORD or ~/.pgpass)",
        *(key, shown, SECRET_URLS_ENV),
    )
    return _without_password(make_url(url))


def _without_password(parsed: URL) -> str:
    return URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query={k: v for k, v in parsed.query.items() if not PASSWORD_KEY.fullmatch(k)},
    ).render_as_string(hide_password=False)


def server_uri(uri: str) -> str:
    """A tracking server's URI without its user name and password, which go to MLflow through
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (this process and the jobs it
    launches): the URI MLflow and the logs see carries no secret. A hidden password (``***``, a
    recorded config's) leaves those variables as they are. The rest of the URI stays as given."""
    try:
        password = _userinfo(uri)[0]
    except (ArgumentError, ValueError):
        return uri
    if password is None:
        return uri
    begin, (start, end) = uri.index("://") + 3, password
    if uri[start:end] != HIDDEN:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(uri[begin : start - 1])
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(uri[start:end])
    return uri[:begin] + uri[end + 1 :]


def scrub(value: Any) -> Any:
    """A config (dicts, lists, strings) with every password in it hidden: what a run records."""
    if isinstance(value, str):  # the whole value when it is a URL: its password may hold a space
        return hide_passwords(hide_password(value) if _URL_START.match(value) else value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def scrub_config(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with every password in its strings hidden (``hydra.overrides`` too):
    for a config that is written where it is not one of ours to scrub, e.g. the launcher config
    and Hydra state submitit pickles for each job. The job reveals the URLs the sweep shared."""
    out = copy.deepcopy(cfg)
    with read_write(out), open_dict(out):
        _scrub_node(out)
    return out


def _scrub_node(node: DictConfig | ListConfig) -> None:
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            _scrub_node(child)
        elif isinstance(value := child._value(), str) and (clean := scrub(value)) != value:
            node[key] = clean


def _scrub_yaml(text: str) -> str:
    """A YAML file's text with the passwords in its values hidden, each value read whole (YAML folds
    a long value over lines, so a line may hold half a URL); free text when it is no YAML."""
    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except (YAMLError, OmegaConfBaseException, ValueError):
        return hide_passwords(text)
    clean = scrub(data)
    return text if clean == data else OmegaConf.to_yaml(OmegaConf.create(clean))


def scrub_files(paths: Iterable[Path]) -> None:
    """Rewrite each YAML file that holds a password with it hidden (write, then rename: a reader
    never sees half a file, and two jobs scrubbing one file leave the same text)."""
    for path in paths:
        try:
            text = path.read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            continue
        clean = _scrub_yaml(text)
        if clean == text:
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(clean)
            os.chmod(tmp, path.stat().st_mode)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def scrub_hydra_files(run_dir: Path) -> None:
    """The config files Hydra wrote for this job (``.hydra/*.yaml``) and, in a multirun, for the
    sweep (``multirun.yaml``): they copy the command line, passwords included."""
    files = sorted((run_dir / ".hydra").glob("*.yaml"))
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        files.append(Path(HydraConfig.get().sweep.dir) / "multirun.yaml")
    scrub_files(files)
