"""The downloader against a real HTTP server on 127.0.0.1 (never the internet): Range resume,
dropped connections, 404s, name checks, and the ``python -m sketchsweep.data.download`` command."""

from __future__ import annotations

import http.server
import io
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from sketchsweep.data.categories import CATEGORIES, check_classes
from sketchsweep.data.download import BASE_URL_ENV, DownloadError, download, main
from sketchsweep.data.folder import DataError, load_folder

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


class FixtureServer(http.server.ThreadingHTTPServer):
    """Serves files under ``root``; honours ``Range: bytes=N-``; can misbehave on demand."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (raw request path, Range header)
        self.drops: dict[str, int] = {}  # path -> first N GETs send half the body, then close
        self.statuses: dict[str, list[int]] = {}  # path -> error statuses to answer first, in order
        self.honor_range = True
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def seen(self, path: str) -> list[str | None]:
        """Range headers of the requests for ``path`` (unquoted), in order."""
        return [rng for raw, rng in self.requests if urllib.parse.unquote(raw) == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FixtureServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, rng))
            queued = srv.statuses.get(path)
            status = queued.pop(0) if queued else None
            drop = srv.drops.get(path, 0) > 0
            if drop:
                srv.drops[path] -= 1
        if status:
            self.send_error(status)
            return
        file = srv.root / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if rng and srv.honor_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start or (rng and srv.honor_range) else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng and srv.honor_range:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if drop:  # headers promise the whole body; send half of it and hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def _npy_bytes(rows: int, seed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).integers(0, 256, size=(rows, 784), dtype=np.uint8))
    return buf.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """Served content, keyed by request path: a few hundred KB so each file takes several chunks."""
    return {
        "/numpy_bitmap/cat.npy": _npy_bytes(300, seed=0),
        "/numpy_bitmap/traffic light.npy": _npy_bytes(250, seed=1),
        "/simplified/cat.ndjson": b'{"word":"cat","drawing":[[[0,10],[0,10]]]}\n' * 500,
    }


@pytest.fixture(scope="module")
def bucket(files, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bucket")
    for path, data in files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_bytes(data)
    return root


@pytest.fixture
def server(bucket, monkeypatch):
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    for var in PROXY_VARS:  # a proxy in the environment must not see 127.0.0.1 traffic
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    srv = FixtureServer(bucket)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def fast(**kw):
    return {"progress": False, "backoff": 0.01, "timeout": 5.0, **kw}


def test_categories_are_the_official_345():
    assert len(CATEGORIES) == 345 == len(set(CATEGORIES))
    assert {"cat", "traffic light", "The Eiffel Tower", "The Great Wall of China", "The Mona Lisa"} <= set(CATEGORIES)
    with pytest.raises(DataError, match=r"unknown class 'dgo'; did you mean 'dog'"):
        check_classes(["dgo"])


def test_check_classes_treats_underscore_as_space():
    assert check_classes(["smiley_face", "cat", "cat"]) == ["smiley face", "cat"]
    # Spelled as the folder has it, when the folder's names are given.
    assert check_classes(["smiley face"], available=["smiley_face", "cat"]) == ["smiley_face"]
    with pytest.raises(DataError, match="did you mean 'cat'"):
        check_classes(["cta"], available=["cat", "dog"])


def test_downloads_two_classes_including_a_space(server, files, tmp_path):
    dest = tmp_path / "qd"
    paths = download(["cat", "traffic_light"], dest, base_url=server.url, **fast())
    assert paths == [dest / "cat.npy", dest / "traffic light.npy"]
    assert (dest / "cat.npy").read_bytes() == files["/numpy_bitmap/cat.npy"]
    assert (dest / "traffic light.npy").read_bytes() == files["/numpy_bitmap/traffic light.npy"]
    assert ("/numpy_bitmap/traffic%20light.npy", None) in server.requests  # URL-encoded on the wire
    assert not list(dest.glob("*.part"))
    assert load_folder(dest).class_names == ["cat", "traffic light"]  # the loader reads what we wrote

    # Complete files are skipped without a request.
    before = len(server.requests)
    download(["cat", "traffic light"], dest, base_url=server.url, **fast())
    assert len(server.requests) == before


def test_dropped_connection_is_retried_and_resumed_with_range(server, files, tmp_path):
    server.drops["/numpy_bitmap/cat.npy"] = 2
    download(["cat"], tmp_path, base_url=server.url, **fast(retries=3))
    ranges = server.seen("/numpy_bitmap/cat.npy")
    assert len(ranges) == 3 and ranges[0] is None
    offsets = [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges[1:]]
    assert 0 < offsets[0] < offsets[1] < len(files["/numpy_bitmap/cat.npy"])
    assert (tmp_path / "cat.npy").read_bytes() == files["/numpy_bitmap/cat.npy"]


def test_5xx_is_retried(server, files, tmp_path):
    server.statuses["/numpy_bitmap/cat.npy"] = [503, 429]
    download(["cat"], tmp_path, base_url=server.url, **fast(retries=2))
    assert len(server.seen("/numpy_bitmap/cat.npy")) == 3
    assert (tmp_path / "cat.npy").read_bytes() == files["/numpy_bitmap/cat.npy"]


def test_out_of_retries_leaves_only_the_part(server, files, tmp_path):
    server.drops["/numpy_bitmap/cat.npy"] = 5
    with pytest.raises(DownloadError, match="gave up after 2 attempt"):
        download(["cat"], tmp_path, base_url=server.url, **fast(retries=1))
    assert not (tmp_path / "cat.npy").exists()
    assert 0 < (tmp_path / "cat.npy.part").stat().st_size < len(files["/numpy_bitmap/cat.npy"])


def test_existing_part_is_resumed(server, files, tmp_path):
    data = files["/numpy_bitmap/cat.npy"]
    (tmp_path / "cat.npy.part").write_bytes(data[:1000])
    download(["cat"], tmp_path, base_url=server.url, **fast())
    assert server.seen("/numpy_bitmap/cat.npy") == ["bytes=1000-"]
    assert (tmp_path / "cat.npy").read_bytes() == data
    assert not (tmp_path / "cat.npy.part").exists()


def test_complete_part_gets_416_and_is_kept(server, files, tmp_path):
    data = files["/numpy_bitmap/cat.npy"]
    (tmp_path / "cat.npy.part").write_bytes(data)
    download(["cat"], tmp_path, base_url=server.url, **fast())
    assert server.seen("/numpy_bitmap/cat.npy") == [f"bytes={len(data)}-"]
    assert (tmp_path / "cat.npy").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server, files, tmp_path):
    server.honor_range = False
    (tmp_path / "cat.npy.part").write_bytes(b"stale bytes that must not survive")
    download(["cat"], tmp_path, base_url=server.url, **fast())
    assert server.seen("/numpy_bitmap/cat.npy") == ["bytes=33-"]
    assert (tmp_path / "cat.npy").read_bytes() == files["/numpy_bitmap/cat.npy"]


def test_simplified_format_fetches_ndjson(server, files, tmp_path):
    [path] = download(["cat"], tmp_path, fmt="simplified", base_url=server.url, **fast())
    assert path == tmp_path / "cat.ndjson"
    assert path.read_bytes() == files["/simplified/cat.ndjson"]
    assert [raw for raw, _ in server.requests] == ["/simplified/cat.ndjson"]


def test_base_url_from_environment(server, files, tmp_path, monkeypatch):
    monkeypatch.setenv(BASE_URL_ENV, server.url + "/")
    download(["cat"], tmp_path, **fast())
    assert (tmp_path / "cat.npy").read_bytes() == files["/numpy_bitmap/cat.npy"]


def test_404_exits_1_without_a_final_file(server, files, tmp_path, capsys):
    dest = tmp_path / "qd"
    rc = main(["--classes", "cat,dog", "--dest", str(dest), "--base-url", server.url, "--retries", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{server.url}/numpy_bitmap/dog.npy: HTTP 404" in err
    assert "1 of 2 file(s) failed: 'dog'" in err
    assert (dest / "cat.npy").read_bytes() == files["/numpy_bitmap/cat.npy"]
    assert not (dest / "dog.npy").exists() and not (dest / "dog.npy.part").exists()
    assert len(server.seen("/numpy_bitmap/dog.npy")) == 1  # not retried


def test_misspelled_class_fails_before_any_request(server, tmp_path, capsys):
    rc = main(["--classes", "cat,dgo", "--dest", str(tmp_path / "qd"), "--base-url", server.url])
    assert rc == 2
    assert "unknown class 'dgo'; did you mean 'dog'" in capsys.readouterr().err
    assert server.requests == []
    assert not (tmp_path / "qd").exists()


def test_cli_subprocess(server, files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != BASE_URL_ENV}
    env["no_proxy"] = "*"
    dest = tmp_path / "qd"
    cmd = [sys.executable, "-m", "sketchsweep.data.download", "--classes", "cat,traffic light", "--dest", str(dest)]
    proc = subprocess.run(
        [*cmd, "--base-url", server.url], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "MB/s" in proc.stderr  # not a terminal: one line per file
    assert (dest / "cat.npy").read_bytes() == files["/numpy_bitmap/cat.npy"]
    assert (dest / "traffic light.npy").read_bytes() == files["/numpy_bitmap/traffic light.npy"]
