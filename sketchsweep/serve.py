"""Draw and classify in the browser: one page with a canvas, and a JSON API, over a trained model.

    python -m sketchsweep.serve model.onnx                         # http://127.0.0.1:8000/
    python -m sketchsweep.serve models:/quickdraw24@champion --port 8080 --top-k 5

MODEL is anything ``predict`` accepts. Strokes are rasterized here, by the rasterizer that turns
Quick, Draw!'s ndjson files into training data (``sketchsweep.data.raster``), and classified by
``sketchsweep.predictor.Predictor`` (ONNX Runtime for an ``.onnx`` file, torch never imported), so
the page shows what a deployment of that model computes. The API (README: Draw in the browser):

- ``POST /api/predict`` ``{"strokes": [[[x0, x1, ...], [y0, y1, ...]], ...]}`` (any coordinate box)
  or ``{"pixels": [784 values 0-255]}`` -> ``{"top_k": [{"label", "probability"}, ...], "bitmap": [784]}``
- ``GET /api/model`` -> class names, the input contract, where the model came from.

A bad request gets HTTP 400 and ``{"error": "<one line>"}``; the server goes on serving.
Starlette and uvicorn (MLflow's own server stack, so nothing new to install) give HTTP/1.1 with
keep-alive and a clean Ctrl-C; the page is static files shipped in the package (``serve_page/``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sketchsweep import cli
from sketchsweep.data.ndjson2npy import is_number
from sketchsweep.data.raster import rasterize, simplify_box
from sketchsweep.modelref import FORMS
from sketchsweep.onnx_model import INPUT_CONTRACT
from sketchsweep.predictor import InputError, Predictor

PAGE = Path(__file__).with_name("serve_page")
MAX_BYTES = 1 << 20  # a request body
MAX_POINTS = 10_000  # over all strokes of a drawing
MAX_COORDINATE = 1e6
SIMPLIFIED_SPAN = 250  # the longer side of Google's simplified drawings spans 252-255 of their 0-255 box
STROKES_FORMAT = "[[[x0, x1, ...], [y0, y1, ...]], ...]"


class RequestError(ValueError):
    """A request the API cannot answer: HTTP 400 with this message."""


# ---------------------------------------------------------------- requests -> uint8 (784,)


def strokes_to_drawing(strokes: Any) -> list[np.ndarray]:
    """Quick, Draw!'s simplified stroke format, in any coordinate box (a canvas's pixels, say), as
    a list of ``(K, 2)`` arrays; raises ``RequestError`` naming the stroke that is wrong."""
    if not isinstance(strokes, list):
        raise RequestError(f"'strokes': expected a list of strokes {STROKES_FORMAT}")
    drawing, points = [], 0
    for i, stroke in enumerate(strokes):
        if not (isinstance(stroke, list) and len(stroke) == 2 and all(isinstance(c, list) for c in stroke)):
            raise RequestError(f"strokes[{i}]: expected [[x0, x1, ...], [y0, y1, ...]]")
        xs, ys = stroke
        if len(xs) != len(ys):
            raise RequestError(f"strokes[{i}]: {len(xs)} x values but {len(ys)} y values")
        points += len(xs)
        if points > MAX_POINTS:
            raise RequestError(f"'strokes': more than {MAX_POINTS} points in all")
        if not all(is_number(v) and abs(v) <= MAX_COORDINATE for v in (*xs, *ys)):
            raise RequestError(f"strokes[{i}]: coordinates must be numbers within ±{MAX_COORDINATE:g}")
        if xs:
            drawing.append(np.column_stack([xs, ys]).astype(np.float64))
    if not drawing:
        raise RequestError("'strokes': no points to draw")
    return drawing


def strokes_bitmap(strokes: Any) -> np.ndarray:
    """The 28x28 bitmap, uint8 ``(784,)``, that ``data.ndjson2npy`` makes of these strokes. Strokes in
    any other box (a canvas's pixels) are first aligned and scaled into Quick, Draw!'s 0-255 box, as
    Google simplified its drawings; ones already there are drawn as they are, as ``ndjson2npy`` draws
    them: both axes starting at 0-5 and the longer side spanning at least ``SIMPLIFIED_SPAN`` up to
    at most 255 (Google's files are not always aligned to exactly 0 and 255)."""
    drawing = strokes_to_drawing(strokes)
    pts = np.concatenate(drawing)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    if (hi - lo).max() < 1e-6:  # one spot: a dot (a scale of 255 / 1e-300 would overflow)
        return rasterize([[np.zeros_like(s) for s in drawing]], chunk=1)[0]
    simplified = lo.min() >= 0 and lo.max() <= 255 - SIMPLIFIED_SPAN and hi.max() <= 255
    simplified = simplified and (hi - lo).max() >= SIMPLIFIED_SPAN
    return rasterize([drawing if simplified else simplify_box(drawing)], chunk=1)[0]


def pixels_bitmap(pixels: Any) -> np.ndarray:
    if not (isinstance(pixels, list) and len(pixels) == 784):
        raise RequestError("'pixels': expected a list of 784 values 0-255 (28x28, row by row, ink 255 on 0)")
    if not all(is_number(v) and 0 <= v <= 255 for v in pixels):
        raise RequestError("'pixels': values must be numbers from 0 to 255")
    return np.rint(np.asarray(pixels, dtype=np.float64)).astype(np.uint8)


def parse_body(body: bytes) -> np.ndarray:
    """A ``/api/predict`` body as the bitmap to classify."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError("the body is not JSON") from None
    if not isinstance(payload, dict) or ("strokes" in payload) == ("pixels" in payload):
        raise RequestError(f'expected a JSON object with "strokes": {STROKES_FORMAT} or "pixels": [784 values]')
    return strokes_bitmap(payload["strokes"]) if "strokes" in payload else pixels_bitmap(payload["pixels"])


# ---------------------------------------------------------------- the app


class Classifier:
    """The model behind the page, answering bitmaps with their ``top_k`` classes."""

    def __init__(self, predictor: Predictor, top_k: int) -> None:
        self.predictor = predictor
        self.top_k = min(top_k, len(predictor.class_names))

    def answer(self, bitmap: np.ndarray) -> dict[str, Any]:
        try:
            top = self.predictor.predict(bitmap.reshape(1, 28, 28), self.top_k)[0]
        except InputError as e:
            raise RequestError(str(e)) from None
        return {"top_k": [{"label": lb, "probability": p} for lb, p in top], "bitmap": bitmap.tolist()}

    def describe(self) -> dict[str, Any]:
        p = self.predictor
        return {
            "class_names": p.class_names,
            "source": p.source,
            "registered": p.registered,
            "run_id": p.run_id,
            "backend": p.backend,
            "temperature": p.temperature,
            "top_k": self.top_k,
            "input": f'POST /api/predict, Content-Type: application/json, with {{"strokes": {STROKES_FORMAT}}} '
            f'(any coordinate box, at most {MAX_POINTS} points) or {{"pixels": [784 values 0-255]}}; '
            f"at most {MAX_BYTES} bytes",
            "model_input": INPUT_CONTRACT,
        }


async def read_body(request: Request) -> bytes:
    """A JSON body, refused past ``MAX_BYTES`` before it is all read."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        # Also keeps other web pages out: a cross-site POST of JSON needs a CORS preflight we never grant.
        raise RequestError("expected Content-Type: application/json")
    if int(request.headers.get("content-length") or 0) > MAX_BYTES:
        raise RequestError(f"the body is over {MAX_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BYTES:
            raise RequestError(f"the body is over {MAX_BYTES} bytes")
    return bytes(body)


def make_app(classifier: Classifier, hosts: list[str] | None = None) -> Starlette:
    """The page and the API; ``hosts``: the only Host headers answered (DNS rebinding), or any."""
    # Rasterizing and ONNX Runtime release the GIL: off the event loop, in as many threads as there
    # are cores (a 10k-point drawing takes ~0.1 s and ~250 MB; Starlette's default pool has 40).
    limiter = anyio.CapacityLimiter(os.cpu_count() or 1)

    async def predict(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
            answer = await anyio.to_thread.run_sync(lambda: classifier.answer(parse_body(body)), limiter=limiter)
            return JSONResponse(answer)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except ClientDisconnect:  # nobody is left to answer
            return JSONResponse({"error": "the client went away"}, status_code=400)

    async def model(request: Request) -> JSONResponse:
        return JSONResponse(classifier.describe())

    async def page(request: Request) -> FileResponse:
        return FileResponse(PAGE / "index.html")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/model", model, methods=["GET"]),
        Mount("/static", StaticFiles(directory=PAGE)),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)] if hosts else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


# ---------------------------------------------------------------- command line


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return int(text)


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); ``OSError`` when the address cannot be had."""
    # IPPROTO_TCP named, not 0 (socket.create_server's): asyncio sets TCP_NODELAY on the accepted
    # connections only then, and without it every keep-alive response waited ~40 ms for an ACK.
    sock = socket.socket(family_of(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sketchsweep.serve", description="Draw in the browser and watch a trained model guess."
    )
    parser.add_argument("model", help=FORMS)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: any free one)")
    parser.add_argument("--top-k", type=int, default=5, help="guesses shown (default 5)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    try:
        classifier = Classifier(Predictor(args.model), args.top_k)
    except cli.UserError as e:  # ModelFileError, ModelRefError
        return cli.fail(e)
    try:
        sock = bind(args.host, args.port)
    except (OSError, OverflowError) as e:
        return cli.fail(f"--host {args.host} --port {args.port}: cannot listen there ({cli.one_line(e)})")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    hosts = None
    if is_loopback(host):  # answer only requests addressed to this machine: no DNS rebinding
        hosts = ["localhost", "127.0.0.1", "[::1]", shown]
    else:
        print(f"warning: listening on {host}, not loopback: anyone who can reach this machine can use it", flush=True)
        if ipaddress.ip_address(host).is_unspecified:  # 0.0.0.0 or ::, not an address to open
            shown = "127.0.0.1" if family_of(host) == socket.AF_INET else "[::1]"
    print(f"serving {args.model} at http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(
        make_app(classifier, hosts),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,  # Ctrl-C stops even while a client stalls mid-request
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it shut down on
        uvicorn.Server(config).run(sockets=[sock])
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
