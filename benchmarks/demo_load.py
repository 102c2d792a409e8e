"""How many of N simultaneous requests the demo server answers, and how they fail otherwise.

Starts the demo's server on a free port of 127.0.0.1 (an untrained ViTBNFFN of depth 1: the
server's handling is measured, not the model), then opens N connections at once, each from its
own thread released by one barrier, each sending one request: `GET /api/models` (`--kind
models`), `POST /api/predict` with a drawn digit (`--kind predict`, answered one at a time under
the server's lock), or half of each (`--kind mixed`). It counts the answers by status and the
failures by kind (a reset, a timeout) and prints them as JSON, with the wall time and the
server's listen backlog.

`--memory` measures the server's memory instead: the server runs in a child process, and N
clients post at once a small PNG that decodes to a large picture (`--side 2048`: a 2048x2048
RGBA PNG of about 30 KB, 16 MB once decoded; `--side 1000`: one the server accepts and decodes).
It prints the server's resident memory when idle and its peak during the burst (Linux: the peak
is reset through `/proc/PID/clear_refs` before the burst and read from `VmHWM`), and the answers.

This is a load check, not a speed benchmark: nothing is a ratio, and the wall time depends on
the machine. docs/demo.md states what it measured.

    python benchmarks/demo_load.py --requests 200 --kind mixed
    python benchmarks/demo_load.py --requests 200 --backlog 5   # a small backlog, for comparison
    python benchmarks/demo_load.py --memory --requests 80 --side 2048
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


def _all_at_once(threads: list[threading.Thread]) -> float:
    """Start every thread, wait for all; the seconds it took."""
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - began


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

    seconds = _all_at_once([threading.Thread(target=one, args=(i,)) for i in range(requests)])
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


_SERVER = """
import sys, torch, bnvit
from bnvit.app.demo import DemoModel, make_server
torch.manual_seed(0)
server = make_server([DemoModel("untrained", bnvit.for_inference(bnvit.ViTBNFFN(depth=1)))], "127.0.0.1", 0)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _big_drawing(side: int) -> bytes:
    """A `side` x `side` RGBA PNG (white, one black stroke): small on the wire, `4 * side**2` bytes decoded."""
    image = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    ImageDraw.Draw(image).line(
        [(side // 2, side // 8), (side // 2, 7 * side // 8)], fill=(0, 0, 0, 255), width=side // 12
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return json.dumps({"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}).encode()


def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


def measure_memory(requests: int, side: int, timeout: float = 120.0) -> dict:
    """The demo server's idle and peak resident memory while `requests` clients post a `side`-pixel RGBA PNG at once."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("GET", "/api/models")  # served once: the server is up and warm
        connection.getresponse().read()
        connection.close()
        time.sleep(1.0)
        idle = _memory_kb(child.pid)["VmRSS"]
        with open(f"/proc/{child.pid}/clear_refs", "w") as refs:
            refs.write("5")  # the peak (VmHWM) starts again from the current size
        body = _big_drawing(side)
        outcomes: collections.Counter[str] = collections.Counter()
        lock, start = threading.Lock(), threading.Barrier(requests)

        def one() -> None:
            start.wait()
            try:
                client = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                client.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
                response = client.getresponse()
                response.read()
                outcome = str(response.status)
                client.close()
            except OSError as err:
                outcome = type(err).__name__
            with lock:
                outcomes[outcome] += 1

        seconds = _all_at_once([threading.Thread(target=one) for _ in range(requests)])
        peak = _memory_kb(child.pid)["VmHWM"]
    finally:
        child.terminate()
        child.wait(timeout=30)
    return dict(
        requests=requests,
        side=side,
        body_bytes=len(body),
        idle_mb=round(idle / 1024, 1),
        peak_mb=round(peak / 1024, 1),
        peak_over_idle_mb=round((peak - idle) / 1024, 1),
        outcomes=dict(sorted(outcomes.items())),
        seconds=round(seconds, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="simultaneous requests (default 200)")
    parser.add_argument("--kind", choices=("models", "predict", "mixed"), default="mixed")
    parser.add_argument("--backlog", type=int, help="listen backlog to try (default: the server's own)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    parser.add_argument("--memory", action="store_true", help="measure the server's memory under big drawings")
    parser.add_argument("--side", type=int, default=2048, help="--memory: the drawings' side in pixels")
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(measure_memory(args.requests, args.side, max(args.timeout, 120.0))))
    else:
        print(json.dumps(measure(args.requests, args.kind, args.backlog, args.timeout)))


if __name__ == "__main__":
    main()
