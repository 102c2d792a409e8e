"""The demo's HTTP server: one static page and a JSON endpoint that classifies a drawing.

Built on the standard library (`http.server.ThreadingHTTPServer`), so the demo needs nothing
beyond bnvit's own dependencies. Routes:

* `GET /` (and `/demo.js`, `/demo.css`): the drawing page.
* `GET /api/models`: the models being served, `{"models": [{"name", "description"}, ...]}`.
* `POST /api/predict` with `{"image": "data:image/png;base64,..."}` (`Content-Type:
  application/json`, at most `MAX_BODY_BYTES`): `{"input": 28 rows of 28 values in 0-255,
  "models": [{"name", "digit", "probability", "probabilities": [10 floats]}, ...]}`.

Every bad request gets a 4xx status with `{"error": message}`; the drawing is prepared with
`bnvit.data.prepare_digit`, exactly as `bnvit predict` prepares a picture file.

Only pages the server itself serves may use it: a request whose `Host` names another site is
answered 421, one whose `Origin` is another page 403 (a web page elsewhere cannot reach the
demo through DNS rebinding, nor post to it). A body shorter than its `Content-Length` is a 400
as soon as the client stops sending (`BODY_IDLE_SECONDS`), not after the connection's
timeout; conflicting `Content-Length` headers, a `Transfer-Encoding` and JSON nested deeper
than Python can parse are 400s too. The listen backlog (`DemoServer.request_queue_size`) lets
a burst of hundreds of connections wait to be accepted instead of being dropped.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import nn

from ..._util.checks import check_bn_statistics
from ...data.digits import open_raster, prepare_digit

__all__ = [
    "BODY_IDLE_SECONDS",
    "MAX_BODY_BYTES",
    "MAX_IMAGE_SIDE",
    "DemoModel",
    "DemoServer",
    "DrawingError",
    "classify_drawing",
    "decode_drawing",
    "make_server",
]

MAX_BODY_BYTES = 1 << 20
"""Largest request body `POST /api/predict` accepts (1 MiB; a drawn canvas is a few tens of kB)."""
MAX_IMAGE_SIDE = 2048
"""Largest width or height of a drawing, in pixels (checked before the image is decoded)."""
BODY_IDLE_SECONDS = 3.0
"""How long the server waits for the next bytes of a request body before answering 400 (a body
shorter than its `Content-Length`); a drawing arrives in well under that on any network."""

_DRAIN_LIMIT = 16 << 20  # an oversized body up to this size is read and discarded, so the client sees the 413
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")
_STATIC = {  # the only files served: no path from the request reaches the file system
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}
_NORM_NAMES = {"ln": "ViT (LayerNorm)", "bn_ffn": "ViTBNFFN", "bn": "ViTBN"}


class DrawingError(ValueError):
    """A request the demo cannot classify; `status` is the HTTP status to answer with (4xx)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DemoModel:
    """A model the demo serves.

    Args:
        name: Shown above its chart (a checkpoint's file name, say).
        model: An inference-ready classifier of `(B, 1, 28, 28)` images in [0, 1] into 10
            classes (`bnvit.for_inference(model)`).
        description: One line under the name; by default read from a bnvit `ViT`'s config
            (`"ViTBNFFN, depth 5"`).
        temperature: The probabilities shown are `softmax(logits / temperature)`: the model's
            calibrated temperature (`bnvit.weights.calibration`), or 1 for the raw softmax.

    Raises:
        ValueError: If a BatchNorm of `model` holds statistics no BatchNorm can have (a
            negative or non-finite running variance, a non-finite running mean).
    """

    name: str
    model: nn.Module
    description: str = field(default="")
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_bn_statistics(self.model, f"the demo's model {self.name!r}")
        if not self.description:
            object.__setattr__(self, "description", describe(self.model))
        if isinstance(self.temperature, bool) or not 0 < float(self.temperature) < float("inf"):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")


def describe(model: nn.Module) -> str:
    """`"ViTBNFFN, depth 5"` for a bnvit `ViT`, else the class name of `model`."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "norm" in config and "depth" in config:
        return f"{_NORM_NAMES.get(config['norm'], config['norm'])}, depth {config['depth']}"
    return type(model).__name__


def decode_drawing(body: bytes) -> Image.Image:
    """The image in a `POST /api/predict` body, decoded; a `DrawingError` says what is wrong with it.

    Args:
        body: The request body: JSON `{"image": "<base64 PNG/JPEG/..., optionally as a data: URL>"}`.

    Returns:
        The decoded PIL image (EXIF orientation applied, as `bnvit.data.load_image` does for files).

    Raises:
        DrawingError: 400 for anything that is not such a JSON object with a readable image,
            413 for an image larger than `MAX_IMAGE_SIDE` on a side.

    Examples:
        >>> decode_drawing(b'{"image": 3}')
        Traceback (most recent call last):
        ...
        bnvit.app.demo.server.DrawingError: "image" must be a string (a base64 PNG or a data: URL), got int
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DrawingError(HTTPStatus.BAD_REQUEST, f"the request body is not JSON: {err}") from None
    except RecursionError:
        raise DrawingError(
            HTTPStatus.BAD_REQUEST, 'the request body nests JSON too deeply; expected {"image": "..."}'
        ) from None
    if not isinstance(payload, dict) or set(payload) != {"image"}:
        got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise DrawingError(
            HTTPStatus.BAD_REQUEST,
            f'expected a JSON object with one field, {{"image": "data:image/png;base64,..."}}; got {got}',
        )
    text = payload["image"]
    if not isinstance(text, str):
        raise DrawingError(
            HTTPStatus.BAD_REQUEST,
            f'"image" must be a string (a base64 PNG or a data: URL), got {type(text).__name__}',
        )
    try:
        data = base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True)
    except (binascii.Error, ValueError) as err:
        raise DrawingError(HTTPStatus.BAD_REQUEST, f'"image" is not valid base64: {err}') from None
    if not data:
        raise DrawingError(HTTPStatus.BAD_REQUEST, '"image" is empty')
    return _open_image(data)


def _open_image(data: bytes) -> Image.Image:
    try:
        image = open_raster(io.BytesIO(data), '"image"')
    except Image.DecompressionBombError as err:
        raise DrawingError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f'"image" has too many pixels: {err}') from None
    except ValueError as err:
        raise DrawingError(HTTPStatus.BAD_REQUEST, str(err)) from None
    width, height = image.size
    if max(width, height) > MAX_IMAGE_SIDE:
        raise DrawingError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the drawing is {width}x{height} pixels; at most {MAX_IMAGE_SIDE} on a side",
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DrawingError(HTTPStatus.BAD_REQUEST, f'"image" is truncated or corrupt: {err}') from None


def classify_drawing(models: Sequence[DemoModel], image: Image.Image) -> dict[str, Any]:
    """Prepare a drawing like `bnvit predict` prepares a picture and classify it with each model.

    Each model's probabilities are `softmax(logits / temperature)`, with its `DemoModel.temperature`.

    Args:
        models: The models to ask.
        image: The drawing (any PIL image; dark on light or light on dark).

    Returns:
        `{"input": the 28x28 model input as rows of 0-255 ints, "models": [{"name", "digit",
        "probability", "probabilities"}, ...]}`.

    Raises:
        DrawingError: 422 if there is no digit in the drawing (a blank canvas).
    """
    try:
        x = prepare_digit(image)
    except ValueError as err:
        raise DrawingError(HTTPStatus.UNPROCESSABLE_ENTITY, f"no digit to classify: {err}") from None
    results = []
    for served in models:
        device = next(iter(served.model.parameters()), torch.empty(0)).device
        with torch.inference_mode():
            p = (served.model(x[None].to(device)).float() / served.temperature).softmax(dim=1)[0].cpu()
        digit = int(p.argmax())
        results.append(
            dict(name=served.name, digit=digit, probability=float(p[digit]), probabilities=[float(v) for v in p])
        )
    pixels = (x[0] * 255).round().to(torch.uint8)  # (28, 28)
    return dict(input=pixels.tolist(), models=results)


class DemoServer(ThreadingHTTPServer):
    """The demo's HTTP server (`make_server` builds one); `url` is where it listens."""

    daemon_threads = True
    request_queue_size = 1024  # the listen backlog (the kernel caps it at net.core.somaxconn)
    body_idle_seconds = BODY_IDLE_SECONDS

    def __init__(
        self,
        address: tuple[str, int],
        models: Sequence[DemoModel],
        *,
        quiet: bool = True,
        allowed_hosts: Sequence[str] = (),
    ) -> None:
        if not models:
            raise ValueError("the demo needs at least one model to serve")
        self.models = list(models)
        self.quiet = quiet
        machine = socket.gethostname()  # how a phone on the network may name this machine
        names = [address[0], "localhost", machine, f"{machine}.local", *allowed_hosts]
        self.host_names = {name.strip("[]").lower() for name in names if name and not _is_ip(name.strip("[]"))}
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.lock = threading.Lock()  # one prediction at a time: the models share the CPU threads anyway
        self.static = {
            route: ((resources.files(__package__) / "static" / name).read_bytes(), kind)
            for route, (name, kind) in _STATIC.items()
        }
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def serves(self, host: str) -> bool:
        """Whether a request's `Host` value (`name[:port]`) names this server.

        An IP address always does (a page reached by its address is its own origin: DNS
        rebinding needs a name); a name only if it is `localhost`, this machine's host name
        (also with `.local`), the name the server was bound to, or one of `allowed_hosts`.

        Examples:
            >>> server = DemoServer(("127.0.0.1", 0), [DemoModel("m", torch.nn.Linear(1, 1))])
            >>> server.serves("127.0.0.1:7860"), server.serves("localhost"), server.serves("evil.example:7860")
            (True, True, False)
            >>> server.server_close()
        """
        name = _host_name(host)
        return name is not None and (_is_ip(name) or name in self.host_names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_name(host: str) -> str | None:
    """The name in a `Host` value, lower-case, without port or IPv6 brackets; None if malformed."""
    host = host.strip().lower()
    match = re.fullmatch(r"\[([0-9a-f:.]+)\](?::\d*)?|([^:\[\]@/\s]+)(?::\d*)?", host)
    return None if match is None else match.group(1) or match.group(2)


def make_server(
    models: Sequence[DemoModel],
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    quiet: bool = True,
    allowed_hosts: Sequence[str] = (),
) -> DemoServer:
    """A demo server bound to `host:port` (port 0: any free port), not yet serving.

    Call `serve_forever()` on it (in a thread, for tests) and `shutdown()` / `server_close()`
    to stop it.

    Args:
        models: One or two models (each shown with its own chart).
        host: The address to listen on; the default, 127.0.0.1, is reachable only from this machine.
        port: The TCP port; 0 picks a free one (read it back from `server.url`).
        quiet: Log only errors, not every request.
        allowed_hosts: Host names, besides `localhost`, this machine's host name, `host` and any
            IP address, that requests may name in their `Host` header (another name the machine
            has on the network, say); requests naming any other host are refused with 421.

    Returns:
        The bound server.

    Raises:
        OSError: If the address cannot be bound (the port is in use, say).
        ValueError: If `models` is empty.
    """
    return DemoServer((host, port), models, quiet=quiet, allowed_hosts=allowed_hosts)


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "bnvit-demo"
    timeout = 30  # seconds a client may take to send its request

    def do_GET(self) -> None:
        if self._foreign():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/models":
            models = [dict(name=m.name, description=m.description) for m in self.server.models]
            self._send_json(HTTPStatus.OK, dict(models=models, max_body_bytes=MAX_BODY_BYTES))
        elif path in self.server.static:
            body, kind = self.server.static[path]
            self._send(HTTPStatus.OK, body, kind)
        elif path == "/api/predict":
            self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /api/predict with a JSON body")
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def do_POST(self) -> None:
        if self._foreign():
            return
        if self.path.split("?", 1)[0] != "/api/predict":
            self._send_error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")
            return
        try:
            body = self._read_body()
            image = decode_drawing(body)
            with self.server.lock:
                result = classify_drawing(self.server.models, image)
        except DrawingError as err:
            self._send_error(err.status, str(err))
            return
        except Exception:  # a bug, not a bad drawing: the trace goes to the server's log, not to the page
            traceback.print_exc()
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "the server failed to classify the drawing")
            return
        self._send_json(HTTPStatus.OK, result)

    def _foreign(self) -> bool:
        """Answer a request from another site (its `Host` or `Origin`): 421 or 403; True if it was one."""
        hosts = self.headers.get_all("Host") or []
        host = hosts[0] if len(hosts) == 1 else None
        problem = None
        if len(hosts) > 1:
            problem = HTTPStatus.BAD_REQUEST, f"the request has {len(hosts)} Host headers; send one"
        elif host is not None and not self.server.serves(host):
            problem = (
                HTTPStatus.MISDIRECTED_REQUEST,
                f"this server does not answer to the host {host!r} (another site's name, as in DNS rebinding); "
                f"open {self.server.url}",
            )
        else:
            origin = self.headers.get("Origin")
            if origin is not None and not (host is not None and origin.lower() == f"http://{host.strip().lower()}"):
                problem = (
                    HTTPStatus.FORBIDDEN,
                    f"requests from the page {origin!r} are refused: only the demo's own page may use its API",
                )
        if problem is None:
            return False
        self.close_connection = True
        self.log_error("refused %s %s: %s", self.command, self.path, problem[1])
        self._send_error(*problem)
        return True

    def _read_body(self) -> bytes:
        kind = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise DrawingError(
                HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not supported: send the body with a Content-Length"
            )
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if len(lengths) > 1:
            self.close_connection = True
            raise DrawingError(
                HTTPStatus.BAD_REQUEST, f"conflicting Content-Length headers: {', '.join(sorted(lengths))}; send one"
            )
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise DrawingError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise DrawingError(HTTPStatus.BAD_REQUEST, f"bad Content-Length: {length_header!r}") from None
        if length > MAX_BODY_BYTES:
            self._discard(length)
            raise DrawingError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are accepted",
            )
        body = self._receive(length, keep=True)
        if len(body) < length:
            self.close_connection = True
            raise DrawingError(
                HTTPStatus.BAD_REQUEST,
                f"the request body ended after {len(body)} of the {length} bytes its Content-Length announced",
            )
        if kind != "application/json":
            raise DrawingError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send the drawing as application/json, not {kind or 'no type'}"
            )
        return body

    def _discard(self, length: int) -> None:
        """Read (part of) an oversized body, so that closing the connection does not reset it under the answer."""
        self.close_connection = True
        self._receive(min(length, _DRAIN_LIMIT), keep=False)

    def _receive(self, length: int, *, keep: bool) -> bytes:
        """Up to `length` body bytes (kept if `keep`), until the client stops sending for `body_idle_seconds`."""
        chunks, left = [], length
        self.connection.settimeout(self.server.body_idle_seconds)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break  # the client closed its side
                left -= len(chunk)
                if keep:
                    chunks.append(chunk)
        except OSError:  # the idle timeout, or a reset
            pass
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(chunks)

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, dict(error=message))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (a malformed request line, an unsupported method) as JSON too."""
        status = HTTPStatus(code)
        self.log_error("%d %s", code, message or status.phrase)
        self.close_connection = True
        self._send_json(status, dict(error=message or status.phrase))

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def log_error(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"bnvit demo: {format % args}\n")
