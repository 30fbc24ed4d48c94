"""serve: the real server on a free loopback port, real HTTP requests, and the page drawn on in
Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import http.client
import itertools
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sketchsweep.data import ndjson2npy
from sketchsweep.predict import Predictor
from sketchsweep.serve import bind
from tests.conftest import cli_env, stop_group
from tests.test_export import TinyRun, tiny_run
from tests.test_predict import strokes

SHARED_NDJSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "ndjson" / "monkey.ndjson"
CHROMIUM = Path("/usr/bin/chromium")
NO_TORCH = "import runpy, sys\nsys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> TinyRun:
    return tiny_run(tmp_path_factory)


class Server:
    """``python -m sketchsweep.serve`` in its own process group, on a port the OS picked."""

    def __init__(self, *args: str, no_torch: bool = False) -> None:
        argv = ["serve", *args, "--port", "0"]
        code = NO_TORCH if no_torch else "import runpy, sys\n"
        code += f"sys.argv = {argv!r}\nrunpy.run_module('sketchsweep.serve', run_name='__main__')\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines = self._read_until("serving ")
        self.url = self.lines[-1].split(" at ")[1].split()[0].rstrip("/")
        self.host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)

    def _read_until(self, prefix: str, timeout: float = 120) -> list[str]:
        """The lines it prints up to the one starting with ``prefix`` (read by a thread: a pipe's
        buffered lines are invisible to select)."""
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout] and None, daemon=True).start()
        seen, end = [], time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line.rstrip("\n"))
            if line.startswith(prefix):
                self._rest = lines
                return seen
        stop_group(self.proc)
        raise AssertionError(f"the server did not start: {seen} {self.proc.stderr.read()}")

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            payload = response.read()
            is_json = response.getheader("content-type", "").startswith("application/json")
            return response.status, json.loads(payload) if is_json else payload
        finally:
            conn.close()

    def predict(self, body: Any) -> dict:
        status, answer = self.request("POST", "/api/predict", body)
        assert status == 200, answer
        return answer

    def interrupt(self) -> tuple[int, str, str]:
        """Ctrl-C, as a terminal sends it; the exit code and what it printed then."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
            err = self.proc.stderr.read()
        finally:
            stop_group(self.proc)
        time.sleep(0.1)  # the reader thread's last lines
        out = []
        while not self._rest.empty():
            out.append(self._rest.get())
        return self.proc.returncode, "".join(out), err


@pytest.fixture(scope="module")
def server(run):
    s = Server(str(run.onnx_path), no_torch=True)  # an .onnx model: torch must never be needed
    yield s
    code, out, err = s.interrupt()
    assert (code, out.strip(), err) == (0, "stopped", ""), "Ctrl-C should stop the server cleanly"


def in_canvas_box(drawing: list[np.ndarray], scale: float = 1.4, offset: float = 37.5) -> list[list[list[float]]]:
    """The drawing as a page sends it: canvas pixels, not Quick, Draw!'s 0-255 box."""
    return [[list(s[:, 0] * scale + offset), list(s[:, 1] * scale + offset)] for s in drawing]


def test_a_circle_drawn_as_strokes_is_guessed_a_circle(server, run):
    for i in range(3):
        answer = server.predict({"strokes": in_canvas_box(strokes("circle", i))})
        labels = [g["label"] for g in answer["top_k"]]
        assert "circle" in labels[:3], answer["top_k"]
        assert len(labels) == len(run.class_names)  # --top-k 5 with 4 classes: all 4, most likely first
        probs = [g["probability"] for g in answer["top_k"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        assert len(answer["bitmap"]) == 784 and max(answer["bitmap"]) == 255


def real_drawings(n: int) -> list[list]:
    """Simplified strokes (0-255 box): real ones beside the repo when there, and synthetic ones."""
    drawings = [[[list(s[:, 0]), list(s[:, 1])] for s in strokes(c, 5)] for c in ("star", "cross")]
    if SHARED_NDJSON.is_file():
        with SHARED_NDJSON.open() as f:
            drawings += [json.loads(next(f))["drawing"] for _ in range(n)]
    return drawings


def test_strokes_give_the_bitmap_ndjson2npy_trains_on(server, tmp_path):
    drawings = real_drawings(20)
    src = tmp_path / "drawings.ndjson"
    src.write_text("".join(json.dumps({"word": "thing", "drawing": d}) + "\n" for d in drawings))
    expected = np.load(ndjson2npy.convert(src, tmp_path / "npy")["thing"])
    assert len(expected) == len(drawings)
    aligned = 0
    for d, row in zip(drawings, expected, strict=True):
        assert server.predict({"strokes": d})["bitmap"] == row.tolist()
        # The same drawing in a canvas's pixels is fitted into the 0-255 box: for a drawing that
        # fills it exactly (most of Google's), the same bitmap up to rounding at the strokes' edges.
        pts = np.concatenate([np.array(s).T for s in d])
        if (pts.min(axis=0) == 0).all() and pts.max() == 255:
            aligned += 1
            moved = server.predict({"strokes": in_canvas_box([np.array(s).T for s in d], 1.7, 12.0)})["bitmap"]
            assert np.abs(np.array(moved) - row.astype(int)).max() <= 1
    assert aligned >= 2


def test_pixels_are_classified_as_predict_does(server, run):
    image = run.val_images[0]
    answer = server.predict({"pixels": image.reshape(-1).tolist()})
    expected = Predictor(run.onnx_path).predict(image[None], len(run.class_names))[0]
    assert [g["label"] for g in answer["top_k"]] == [label for label, _ in expected]
    np.testing.assert_allclose([g["probability"] for g in answer["top_k"]], [p for _, p in expected], atol=1e-6)
    assert answer["bitmap"] == image.reshape(-1).tolist()


def test_the_model_is_described(server, run):
    status, info = server.request("GET", "/api/model")
    assert status == 200
    assert info["class_names"] == run.class_names
    assert (info["source"], info["run_id"], info["backend"]) == (str(run.onnx_path), run.run_id, "onnxruntime")
    assert info["top_k"] == len(run.class_names) and "uint8 (N, 28, 28)" in info["model_input"]
    status, page = server.request("GET", "/")
    assert status == 200 and b'<canvas id="canvas"' in page
    for asset in ("/static/app.js", "/static/style.css"):
        assert server.request("GET", asset)[0] == 200


BAD_REQUESTS = {
    "not JSON": b"{strokes: nope",
    "not an object": b"[1, 2]",
    "no strokes": b'{"lines": []}',
    "no points": b'{"strokes": [[[], []]]}',
    "strokes not a list": b'{"strokes": "circle"}',
    "a stroke of three lists": b'{"strokes": [[[1, 2], [3, 4], [5, 6]]]}',
    "mismatched x and y": b'{"strokes": [[[1, 2, 3], [4, 5]]]}',
    "a coordinate that is a string": b'{"strokes": [[[1, "2"], [3, 4]]]}',
    "a coordinate that is true": b'{"strokes": [[[1, true], [3, 4]]]}',
    "a NaN coordinate": b'{"strokes": [[[1, NaN], [3, 4]]]}',
    "an integer too big for a float": b'{"strokes": [[[1, 1' + b"0" * 400 + b"], [3, 4]]]}",
    "a coordinate past 1e6": b'{"strokes": [[[-1e308, 1e308], [3, 4]]]}',
    "a pixel too big for a float": b'{"pixels": [1' + b"0" * 400 + b", 0" * 783 + b"]}",
    "over 10k points": json.dumps({"strokes": [[list(range(5001)), list(range(5001))]] * 2}).encode(),
    "over 1 MB": json.dumps({"strokes": [[[1.25] * 120000, [2.25] * 120000]]}).encode(),
    "784 pixels expected": b'{"pixels": [0, 255]}',
    "a pixel over 255": json.dumps({"pixels": [0] * 783 + [256]}).encode(),
    "both strokes and pixels": json.dumps({"strokes": [[[1], [2]]], "pixels": [0] * 784}).encode(),
    "deeply nested": b"[" * 100000 + b"]" * 100000,
}


def test_bad_requests_get_400_and_the_server_goes_on(server):
    assert len(BAD_REQUESTS["over 1 MB"]) > 1 << 20
    good = {"strokes": in_canvas_box(strokes("circle", 0))}
    for why, body in BAD_REQUESTS.items():
        status, answer = server.request("POST", "/api/predict", raw=body)
        assert status == 400, why
        assert isinstance(answer["error"], str) and "\n" not in answer["error"] and answer["error"], why
        assert "circle" in [g["label"] for g in server.predict(good)["top_k"]], why
    for headers, why in (({"Content-Type": "text/plain"}, "Content-Type"), ({"Host": "rebound.example"}, "host")):
        status, answer = server.request("POST", "/api/predict", good, headers=headers)
        assert status == 400 and why in str(answer), answer
    assert server.request("GET", "/api/predict") == (405, {"error": "Method Not Allowed"})
    assert server.request("GET", "/no-such-page") == (404, {"error": "Not Found"})
    assert server.request("GET", "/static/../serve.py")[0] == 404
    assert server.proc.poll() is None


def test_odd_but_valid_drawings(server):
    """A drawing anywhere on a canvas is framed the same; one spot is a dot, however small the box."""
    stroke = [[3, 128, 253, 128, 3], [220, 180, 220, 254, 220]]  # wide, in a 400 px canvas's top-left
    moved = [[x + 100 for x in stroke[0]], [y - 150 for y in stroke[1]]]
    assert server.predict({"strokes": [stroke]})["bitmap"] == server.predict({"strokes": [moved]})["bitmap"]
    dot = server.predict({"strokes": [[[0, 5e-324], [7, 7]]]})["bitmap"]
    assert dot == server.predict({"strokes": [[[42], [42]]]})["bitmap"] and 0 < sum(v > 0 for v in dot) < 12


def test_command_line_errors_are_one_line(run, tmp_path):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            ([str(not_onnx)], str(not_onnx)),
            ([str(tmp_path / "missing-run")], "missing-run"),
            ([str(run.onnx_path), "--port", port], f"--port {port}"),
            ([str(run.onnx_path), "--host", "256.1.1.1"], "--host 256.1.1.1"),
            ([str(run.onnx_path), "--host", "::1", "--port", "70000"], "expected a port number 0-65535"),
        ]
        for args, named in cases:
            proc = subprocess.run(
                [sys.executable, "-m", "sketchsweep.serve", *args],
                env=cli_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 2, proc.stderr
            *usage, error = proc.stderr.splitlines()  # argparse's own errors come after its usage line
            assert error.startswith(("error: ", "python -m sketchsweep.serve: error: ")), proc.stderr
            assert named in error and all(u.startswith(("usage: ", " ")) for u in usage), proc.stderr


def test_connections_send_without_delay():
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket names
    IPPROTO_TCP (socket.create_server's protocol 0 made each keep-alive answer wait ~40 ms)."""
    with bind("127.0.0.1", 0) as sock:
        assert (sock.family, sock.type, sock.proto) == (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def test_listening_beyond_loopback_is_announced(run):
    s = Server(str(run.onnx_path), "--host", "0.0.0.0")
    try:
        assert s.lines[0].startswith("warning: listening on 0.0.0.0, not loopback"), s.lines
        assert s.predict({"pixels": run.val_images[1].reshape(-1).tolist()})["top_k"]
    finally:
        code, _, err = s.interrupt()
    assert code == 0, err


def test_a_run_folder_is_served_with_pytorch(run):
    s = Server(str(run.run_dir), "--top-k", "2")
    try:
        info = s.request("GET", "/api/model")[1]
        assert (info["backend"], info["top_k"], info["run_id"]) == ("torch", 2, run.run_id)
        assert len(s.predict({"strokes": in_canvas_box(strokes("circle", 1))})["top_k"]) == 2
    finally:
        s.interrupt()


# ---------------------------------------------------------------- the page, in a real browser


def chromium():
    """Debian's chromium through Playwright, or a skip saying why there is none."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (make test installs Debian's chromium as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    return sync_api.sync_playwright()


def draw(page, drawing: list[np.ndarray], box) -> None:
    """Draw strokes given in the 0-255 box with the mouse, scaled into the canvas's box on screen."""
    size = min(box["width"], box["height"]) * 0.8
    left, top = box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1
    for stroke in drawing:
        xy = [(left + x / 255 * size, top + y / 255 * size) for x, y in stroke]
        page.mouse.move(*xy[0])
        page.mouse.down()
        for x, y in xy[1:]:
            page.mouse.move(x, y, steps=2)
        page.mouse.up()


INK = (  # dark pixels on the drawing canvas
    "() => { const c = document.getElementById('canvas');"
    " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
    " let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] < 250; return n; }"
)
SENDS = """
window.sent = [];
const fetched = window.fetch;
window.fetch = (url, options) => {
  if (String(url).includes('api/predict')) window.sent.push(performance.now());
  return fetched(url, options);
};
"""
TWO_FINGERS = """() => {
  const c = document.getElementById('canvas'), r = c.getBoundingClientRect(), k = c.width / r.width;
  const ev = (type, id, x) => c.dispatchEvent(new PointerEvent(type, {pointerId: id, isPrimary: id === 1,
    pointerType: 'touch', button: 0, clientX: r.left + x / k, clientY: r.top + x / k, bubbles: true}));
  ev('pointerdown', 1, 50); ev('pointerdown', 2, 300); ev('pointermove', 1, 100); ev('pointermove', 2, 320);
  ev('pointerup', 2, 320); ev('pointermove', 1, 150); ev('pointerup', 1, 150);
  return strokes.map(([xs, ys]) => xs.map(Math.round));
}"""
GUESSES = "() => [...document.querySelectorAll('#guesses li')].map(li => li.dataset.label)"


def test_drawing_a_circle_on_the_page(server, tmp_path):
    with chromium() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.add_init_script(SENDS)
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready=true]")
            assert "circle" in page.inner_text("#classes")
            draw(page, strokes("circle", 0), page.locator("#canvas").bounding_box())
            page.wait_for_function(f"({GUESSES})().length > 0")
            # The answer to the finished drawing (sent once it stopped changing), however long it takes.
            page.wait_for_function("() => shown === version && !inFlight")
            labels = page.evaluate(GUESSES)
            assert page.evaluate(INK) > 500
            assert "circle" in labels[:3], labels
            sent = page.evaluate("() => window.sent")  # the page's clock, not this process's
            assert len(sent) >= 2, "the guesses should update while drawing"
            # 100 ms apart by the page's timers (which may fire a fraction of a ms early on this clock).
            assert min(b - a for a, b in itertools.pairwise(sent)) >= 95, "at most ~10 requests a second"
            page.screenshot(path=str(tmp_path / "circle.png"))
            page.click("#undo")  # the circle was one stroke: nothing left
            page.wait_for_function(f"({GUESSES})().length === 0")
            assert page.evaluate(INK) == 0, "Undo should take the stroke off the canvas"
            draw(page, strokes("circle", 1), page.locator("#canvas").bounding_box())
            page.wait_for_function(f"({GUESSES})().length > 0")
            page.click("#clear")
            page.wait_for_function(f"({GUESSES})().length === 0")
            assert page.evaluate(INK) == 0, "Clear should leave an empty canvas"
            page.screenshot(path=str(tmp_path / "cleared.png"))
            # Two fingers: the first draws, the second neither starts a stroke nor joins the first.
            assert page.evaluate(TWO_FINGERS) == [[50, 100, 150]]
            assert (tmp_path / "circle.png").stat().st_size > 1000
        finally:
            browser.close()
