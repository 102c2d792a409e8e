"""The demo's HTTP server: one static page and a JSON endpoint that classifies a drawing.

A Starlette application served by uvicorn with h11, whose strict HTTP/1.1 parsing refuses
malformed requests (`Content-Length: +5`, `1_0`, conflicting lengths, a length with chunked
framing) with a 400 before they reach the application. Routes:

* `GET /` (and `/demo.js`, `/demo.css`): the drawing page.
* `GET /api/models`: the models being served, `{"models": [{"name", "description"}, ...]}`.
* `POST /api/predict` with `{"image": "data:image/png;base64,..."}` (`Content-Type:
  application/json`, at most `MAX_BODY_BYTES`): `{"input": 28 rows of 28 values in 0-255,
  "models": [{"name", "digit", "probability", "probabilities": [10 floats]}, ...], "one_digit":
  false when the drawing holds no single digit (each digit is then a guess), "not_one_digit": why}`.

Every bad request gets a 4xx status with `{"error": message}`; the drawing is prepared with
`bnvit.data.prepare_digit`, exactly as `bnvit predict` prepares a picture file.

Only pages the server itself serves may use it: a request whose `Host` names another site is
answered 421, one whose `Origin` is another page 403 (a web page elsewhere cannot reach the
demo through DNS rebinding, nor post to it).

Memory is bounded whatever the clients send: at most `BODY_SLOTS` request bodies are read at
once (the others wait with their bytes unread, in the kernel and h11's bounded buffer), each at
most `MAX_BODY_BYTES`; at most `DECODE_SLOTS` drawings are decoded and prepared at once, each
checked from its header to have at most `MAX_DRAWING_PIXELS` pixels before anything is decoded;
the models answer one drawing at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import sys
import threading
import traceback
from collections.abc import Sequence
from http import HTTPStatus
from importlib import resources
from typing import Any

import anyio.to_thread
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .drawing import MAX_BODY_BYTES, DemoModel, DrawingError, classify_drawing, decode_drawing, prepare_drawing

__all__ = ["BODY_IDLE_SECONDS", "BODY_SLOTS", "DECODE_SLOTS", "DemoServer", "make_server"]

BODY_IDLE_SECONDS = 3.0
"""How long the server waits for the next bytes of a request body before answering 400 (a body
shorter than its `Content-Length`); a drawing arrives in well under that on any network."""
BODY_SLOTS = 8
"""How many request bodies are read into memory at once (8 MiB at most)."""
DECODE_SLOTS = 2
"""How many drawings are decoded and prepared at once (each at most `MAX_DRAWING_PIXELS`)."""
QUEUE_SECONDS = 60.0
"""How long a request waits for a slot before it is answered 503 (the server is saturated)."""

_DRAIN_LIMIT = 16 << 20  # an oversized body up to this size is read and discarded, so the client sees the 413
_STATIC = {  # the only files served: no path from the request reaches the file system
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
}


def _json(status: int, payload: dict[str, Any], *, close: bool = False) -> Response:
    headers = {**_HEADERS, **({"Connection": "close"} if close else {})}
    return JSONResponse(payload, status_code=int(status), headers=headers)


def _error(status: int, message: str, *, close: bool = False) -> Response:
    return _json(status, dict(error=message), close=close)


class DemoServer:
    """The demo's server (`make_server` builds one): a bound socket, a Starlette app, uvicorn to serve it.

    `url` is where it listens; `serve_forever()` serves until `shutdown()` (from another thread)
    or Ctrl+C; `server_close()` closes the socket.
    """

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
        self.lock = threading.Lock()  # one prediction at a time: the models share the CPU threads anyway
        self.static = {
            route: ((resources.files(__package__) / "static" / name).read_bytes(), kind)
            for route, (name, kind) in _STATIC.items()
        }
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.request_queue_size)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self.app = _application(self)
        self._uvicorn: uvicorn.Server | None = None
        self._stopped = threading.Event()
        self._stopped.set()

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

    def serve_forever(self) -> None:
        """Serve until `shutdown()` or Ctrl+C (uvicorn handles the signal when this runs in the main thread)."""
        config = uvicorn.Config(
            self.app,
            http="h11",
            loop="asyncio",
            lifespan="off",
            ws="none",
            interface="asgi3",
            backlog=self.request_queue_size,
            timeout_keep_alive=5,
            h11_max_incomplete_event_size=16 * 1024,  # request line and headers
            log_config=None,  # leave the process's logging as it is
            access_log=not self.quiet,
            log_level="info" if not self.quiet else "warning",
            server_header=False,
        )
        self._uvicorn = uvicorn.Server(config)
        self._stopped.clear()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` (called from another thread) and wait until it has returned."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        self._stopped.wait(timeout=30)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()


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


# ---------------------------------------------------------------------- the application


def _application(server: DemoServer) -> Starlette:
    bodies, decoding = asyncio.Semaphore(BODY_SLOTS), asyncio.Semaphore(DECODE_SLOTS)

    async def page(request: Request) -> Response:
        body, kind = server.static[request.url.path]
        return Response(body, media_type=kind, headers=_HEADERS)

    async def models(request: Request) -> Response:
        listed = [dict(name=m.name, description=m.description) for m in server.models]
        return _json(HTTPStatus.OK, dict(models=listed, max_body_bytes=MAX_BODY_BYTES))

    async def predict(request: Request) -> Response:
        try:
            async with _slot(bodies):
                body = await _read_body(request, server.body_idle_seconds)
            async with _slot(decoding):  # decoded and prepared within the slot: 3 KB leave it
                x = await anyio.to_thread.run_sync(_model_input, body)
            del body
            result = await anyio.to_thread.run_sync(_classify, server, x)
        except DrawingError as err:
            return _error(err.status, str(err), close=err.status >= 500 or err.status in (400, 411, 413))
        return _json(HTTPStatus.OK, result)

    async def http_error(request: Request, err: Exception) -> Response:
        status = err.status_code if isinstance(err, HTTPException) else 500
        if status == HTTPStatus.NOT_FOUND:
            return _error(status, f"no such page: {request.method} {request.url.path}")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            return _error(status, f"{request.method} {request.url.path}: not allowed; {_ALLOWED[request.url.path]}")
        return _error(status, HTTPStatus(status).phrase)

    async def failure(request: Request, err: Exception) -> Response:  # a bug, not a bad request: the trace to the log
        traceback.print_exception(err, file=sys.stderr)
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "the server failed to classify the drawing", close=True)

    routes = [Route(path, page, methods=["GET"]) for path in server.static]
    routes += [Route("/api/models", models, methods=["GET"]), Route("/api/predict", predict, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: failure})
    return _SameSite(app, server)


_ALLOWED = {"/api/predict": "use POST /api/predict with a JSON body", "/api/models": "use GET"}
_ALLOWED.update({path: "use GET" for path in _STATIC})


class _slot:  # noqa: N801  (used as a context manager, like a lock)
    """An `asyncio.Semaphore` slot, waited for at most `QUEUE_SECONDS` (then a 503)."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore = semaphore

    async def __aenter__(self) -> None:
        try:
            await asyncio.wait_for(self.semaphore.acquire(), QUEUE_SECONDS)
        except asyncio.TimeoutError:
            raise DrawingError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try again") from None

    async def __aexit__(self, *exc: object) -> None:
        self.semaphore.release()


def _model_input(body: bytes) -> torch.Tensor:
    image = decode_drawing(body)
    try:
        return prepare_drawing(image)
    finally:
        image.close()


def _classify(server: DemoServer, x: torch.Tensor) -> dict[str, Any]:
    with server.lock:
        return classify_drawing(server.models, x)


async def _read_body(request: Request, idle_seconds: float) -> bytes:
    """The request body, checked: JSON type, a length, at most `MAX_BODY_BYTES`, all of it arriving in time."""
    headers = request.headers
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    length_header = headers.get("content-length")  # h11 has checked it: digits only, one value
    if length_header is None and headers.get("transfer-encoding") is None:
        raise DrawingError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
    length = int(length_header) if length_header is not None else None
    if length is not None and length > MAX_BODY_BYTES:
        await _receive(request, min(length, _DRAIN_LIMIT), idle_seconds, keep=False)
        raise DrawingError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are accepted",
        )
    body = await _receive(request, MAX_BODY_BYTES + 1, idle_seconds, keep=True)
    if len(body) > MAX_BODY_BYTES:  # chunked, without a length
        raise DrawingError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body is over {MAX_BODY_BYTES} bytes")
    if length is not None and len(body) < length:
        raise DrawingError(
            HTTPStatus.BAD_REQUEST,
            f"the request body ended after {len(body)} of the {length} bytes its Content-Length announced",
        )
    if kind != "application/json":
        raise DrawingError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send the drawing as application/json, not {kind or 'no type'}"
        )
    return body


async def _receive(request: Request, limit: int, idle_seconds: float, *, keep: bool) -> bytes:
    """Up to `limit` body bytes (kept if `keep`), until the client stops sending for `idle_seconds`."""
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    try:
        while size < limit:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_seconds)
            size += len(chunk)
            if keep:
                chunks.append(chunk)
    except (StopAsyncIteration, asyncio.TimeoutError, ClientDisconnect):
        pass
    return b"".join(chunks)


class _SameSite:
    """ASGI middleware: a request from another site (its `Host` or `Origin`) is answered 421 or 403."""

    def __init__(self, app: Starlette, server: DemoServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            problem = self._problem([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]])
            if problem is not None:
                print(f"bnvit demo: refused {scope['method']} {scope['path']}: {problem[1]}", file=sys.stderr)
                await _error(*problem, close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, headers: list[tuple[str, str]]) -> tuple[int, str] | None:
        hosts = [value for name, value in headers if name == "host"]
        host = hosts[0] if len(hosts) == 1 else None
        if len(hosts) > 1:
            return HTTPStatus.BAD_REQUEST, f"the request has {len(hosts)} Host headers; send one"
        if host is not None and not self.server.serves(host):
            return (
                HTTPStatus.MISDIRECTED_REQUEST,
                f"this server does not answer to the host {host!r} (another site's name, as in DNS rebinding); "
                f"open {self.server.url}",
            )
        origin = next((value for name, value in headers if name == "origin"), None)
        if origin is not None and not (host is not None and origin.lower() == f"http://{host.strip().lower()}"):
            return (
                HTTPStatus.FORBIDDEN,
                f"requests from the page {origin!r} are refused: only the demo's own page may use its API",
            )
        return None
