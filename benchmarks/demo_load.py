"""How many of N simultaneous requests the demo server answers, and how they fail otherwise.

Starts the demo's server on a free port of 127.0.0.1 (an untrained ViTBNFFN of depth 1: the
server's handling is measured, not the model), then opens N connections at once, each from its
own thread released by one barrier, each sending one request: `GET /api/models` (`--kind
models`), `POST /api/predict` with a drawn digit (`--kind predict`, answered one at a time under
the server's lock), or half of each (`--kind mixed`). It counts the answers by status and the
failures by kind (a reset, a timeout) and prints them as JSON, with the wall time and the
server's listen backlog.

This is a load check, not a speed benchmark: nothing is a ratio, and the wall time depends on
the machine. docs/demo.md states what it measured.

    python benchmarks/demo_load.py --requests 200 --kind mixed
    python benchmarks/demo_load.py --requests 200 --backlog 5   # the socketserver default, for comparison
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import io
import json
import threading
import time

import torch
from PIL import Image, ImageDraw

import bnvit
from bnvit.app.demo import DemoModel, DemoServer, make_server


def _drawing() -> bytes:
    """A '1' drawn on a white 280x280 canvas, as the page sends it."""
    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).line([(140, 40), (140, 240)], fill=0, width=24)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return json.dumps({"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}).encode()


def measure(requests: int, kind: str = "mixed", backlog: int | None = None, timeout: float = 60.0) -> dict:
    """Send `requests` requests at once to a fresh demo server; the outcomes, counted."""
    torch.manual_seed(0)
    model = DemoModel("untrained", bnvit.for_inference(bnvit.ViTBNFFN(depth=1)))
    if backlog is not None:
        DemoServer.request_queue_size = backlog  # read when the server starts listening
    server = make_server([model], "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    body = _drawing()
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    start = threading.Barrier(requests)

    def one(index: int) -> None:
        post = kind == "predict" or (kind == "mixed" and index % 2)
        start.wait()
        try:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
            if post:
                connection.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
            else:
                connection.request("GET", "/api/models")
            response = connection.getresponse()
            response.read()
            outcome = str(response.status)
            connection.close()
        except OSError as err:  # ConnectionResetError, TimeoutError, ...
            outcome = type(err).__name__
        with lock:
            outcomes[outcome] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    server.shutdown()
    server.server_close()
    return dict(
        requests=requests,
        kind=kind,
        backlog=server.request_queue_size,
        answered=sum(n for outcome, n in outcomes.items() if outcome.isdigit()),
        outcomes=dict(sorted(outcomes.items())),
        seconds=round(seconds, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="simultaneous requests (default 200)")
    parser.add_argument("--kind", choices=("models", "predict", "mixed"), default="mixed")
    parser.add_argument("--backlog", type=int, help="listen backlog to try (default: the server's own)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    args = parser.parse_args()
    print(json.dumps(measure(args.requests, args.kind, args.backlog, args.timeout)))


if __name__ == "__main__":
    main()
