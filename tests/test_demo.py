"""`bnvit demo`: its HTTP API (good and bad requests), its command line, and the page in headless Chromium.

The browser tests draw a real MNIST test digit on the page, stroke by stroke, with the mouse
and with a finger, and check that the page shows that digit as the prediction. They need
selenium and Chromium with chromedriver (Debian: `apt-get install chromium chromium-driver`)
and are skipped with the reason when either is missing; the tests with a trained model need
the article's checkpoints (`BNVIT_REFERENCE`) and MNIST (`BNVIT_DATA`).
"""

from __future__ import annotations

import base64
import http.client
import inspect
import io
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

import bnvit
import bnvit.app.demo
from _bnvit_cli import main
from bnvit.app.demo import MAX_BODY_BYTES, MAX_DRAWING_PIXELS, MAX_IMAGE_SIDE, DemoModel, DemoServer, make_server
from bnvit.app.demo.browser import find_chromium, first_confident_digit, strokes_from_digit
from bnvit.data import load_mnist, prepare_digit
from conftest import REFERENCE_CHECKPOINTS

CHECKPOINT = "VITBNFFN_d5_15.pth"

# ---------------------------------------------------------------------------- helpers and fixtures


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def drawing(image: Image.Image) -> bytes:
    return json.dumps({"image": png_data_url(image)}).encode()


def request(server: DemoServer, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
    """`(status, headers, body bytes)` of one request to `server`."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(server.url + path.lstrip("/"), data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def post(server: DemoServer, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    status, headers, data = request(server, "POST", "/api/predict", body, content_type)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(data)


def serving(models: list[DemoModel]) -> Iterator[DemoServer]:
    server = make_server(models, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def toy_server() -> Iterator[DemoServer]:
    """A server with an untrained model: enough for the requests it must refuse."""
    yield from serving([DemoModel("untrained", bnvit.for_inference(bnvit.ViTBNFFN(depth=1)))])


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    path = REFERENCE_CHECKPOINTS / CHECKPOINT
    if not path.is_file():
        pytest.skip(
            f"{CHECKPOINT} not found in {REFERENCE_CHECKPOINTS}: set BNVIT_REFERENCE to the article's checkpoints"
        )
    return bnvit.for_inference(bnvit.load_model(path))


@pytest.fixture(scope="module")
def server(trained: torch.nn.Module) -> Iterator[DemoServer]:
    yield from serving([DemoModel(CHECKPOINT, trained)])


@pytest.fixture(scope="module")
def digit(trained: torch.nn.Module, mnist_root: Path) -> tuple[torch.Tensor, int]:
    """The first MNIST test digit the model gets right with p >= 0.99 through prepare_digit: a fair test of the page."""
    images, labels = load_mnist(mnist_root, train=False)
    index = first_confident_digit([trained], images, labels)
    with torch.inference_mode():
        p = trained(prepare_digit(images[index].numpy())[None]).softmax(1)[0]
    assert int(p.argmax()) == int(labels[index]) and float(p.max()) >= 0.99
    return images[index], int(labels[index])


# ---------------------------------------------------------------------------- the HTTP API


def test_page_and_model_list(toy_server):
    status, headers, body = request(toy_server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<canvas id="canvas"' in body and b"demo.js" in body
    for path, kind in (("/demo.js", "text/javascript"), ("/demo.css", "text/css")):
        status, headers, _ = request(toy_server, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind)
    status, _, body = request(toy_server, "GET", "/api/models")
    assert status == 200
    assert json.loads(body) == dict(
        models=[dict(name="untrained", description="ViTBNFFN, depth 1")], max_body_bytes=MAX_BODY_BYTES
    )


def test_binds_to_this_machine_only_by_default(toy_server):
    assert toy_server.server_address[0] == "127.0.0.1"
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BLANK = Image.new("L", (280, 280), 255)
TRUNCATED_PNG = _png_bytes(Image.effect_noise((64, 64), 50).convert("L"))[:300]
HUGE_IMAGE = Image.new("L", (MAX_IMAGE_SIDE + 1, 8), 255)
MANY_PIXELS = Image.new("RGBA", (1025, 1024), (255, 255, 255, 255))

BAD_REQUESTS = {
    "not JSON": (b"this is not JSON", 400, "not JSON"),
    "not UTF-8": (b"\xff\xfe\x00garbage", 400, "not JSON"),
    "a JSON list": (b"[1, 2, 3]", 400, "one field"),
    "no image field": (json.dumps({"picture": "abc"}).encode(), 400, "one field"),
    "an extra field": (json.dumps({"image": "abc", "model": 1}).encode(), 400, "one field"),
    "image not a string": (json.dumps({"image": 42}).encode(), 400, "must be a string"),
    "bad base64": (json.dumps({"image": "data:image/png;base64,@@not*base64!!"}).encode(), 400, "base64"),
    "empty image": (json.dumps({"image": "data:image/png;base64,"}).encode(), 400, "empty"),
    "not an image": (json.dumps({"image": _b64(b"hello, this is text")}).encode(), 400, "not an image"),
    "EPS": (json.dumps({"image": _b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")}).encode(), 400, "EPS"),
    "PDF": (json.dumps({"image": _b64(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")}).encode(), 400, "not opened: use PNG"),
    "truncated PNG": (json.dumps({"image": _b64(TRUNCATED_PNG)}).encode(), 400, "truncated or corrupt"),
    "image too large": (drawing(HUGE_IMAGE), 413, f"{MAX_IMAGE_SIDE} on a side"),
    "too many pixels": (drawing(MANY_PIXELS), 413, f"at most {MAX_DRAWING_PIXELS:,} pixels"),
    "a 5,000-digit integer": (b'{"image": ' + b"1" * 5000 + b"}", 400, "not JSON"),
    "blank canvas": (drawing(BLANK), 422, "no digit"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_drawings_get_a_4xx_with_a_message(toy_server, case):
    body, expected, fragment = BAD_REQUESTS[case]
    status, answer = post(toy_server, body)
    assert status == expected, answer
    assert set(answer) == {"error"} and fragment in answer["error"]
    assert "Traceback" not in answer["error"]


def test_oversized_body_is_refused_before_it_is_parsed(toy_server):
    status, answer = post(toy_server, b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert status == 413 and str(MAX_BODY_BYTES) in answer["error"]


def test_wrong_content_type_missing_length_wrong_route_and_method(toy_server):
    status, answer = post(toy_server, drawing(BLANK), content_type="text/plain")
    assert status == 415 and "application/json" in answer["error"]
    connection = http.client.HTTPConnection(*toy_server.server_address[:2], timeout=10)
    connection.putrequest("POST", "/api/predict")
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()  # no Content-Length, no body
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    connection.close()
    for method, path, expected in (
        ("GET", "/api/predict", 405),
        ("GET", "/../../etc/passwd", 404),
        ("POST", "/api/other", 404),
        ("PUT", "/api/predict", 405),
    ):
        status, headers, body = request(toy_server, method, path, b"{}", "application/json")
        assert status == expected and headers["Content-Type"] == "application/json", (method, path)
        assert "error" in json.loads(body)


def raw(server: DemoServer, head: str, body: bytes = b"", timeout: float = 15) -> tuple[int, dict]:
    """Send `head` (request line and headers, CRLF-separated, no blank line) and `body` as they are; the answer."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())


def with_headers(server: DemoServer, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple:
    """`(status, answer)` of a request with exactly these headers (Host included), through http.client."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=15)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    answer = (response.status, json.loads(response.read()))
    connection.close()
    return answer


def test_requests_naming_another_host_are_refused_dns_rebinding(toy_server):
    port = toy_server.server_address[1]
    for method, path, body in (
        ("GET", "/api/models", b""),
        ("GET", "/", b""),
        ("POST", "/api/predict", drawing(BLANK)),
    ):
        headers = {"Host": f"evil.example:{port}", "Content-Type": "application/json"}
        status, answer = with_headers(toy_server, method, path, headers, body)
        assert status == 421 and "evil.example" in answer["error"], (method, path)
    machine = socket.gethostname()
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "[::1]:80", "10.0.0.7", f"{machine}.local"):
        status, answer = with_headers(toy_server, "GET", "/api/models", {"Host": host})
        assert status == 200, host
    status, answer = with_headers(toy_server, "GET", "/api/models", {"Host": "127.0.0.1.nip.io"})
    assert status == 421


def test_requests_from_another_page_are_refused(toy_server):
    host = f"127.0.0.1:{toy_server.server_address[1]}"
    for origin in ("http://evil.example", f"http://{host}.evil.example", "null", f"https://{host}"):
        headers = {"Host": host, "Origin": origin, "Content-Type": "application/json"}
        status, answer = with_headers(toy_server, "POST", "/api/predict", headers, drawing(BLANK))
        assert status == 403 and "only the demo's own page" in answer["error"], origin
    status, _ = with_headers(toy_server, "GET", "/api/models", {"Host": host, "Origin": "http://evil.example"})
    assert status == 403
    headers = {"Host": host, "Origin": f"http://{host}", "Content-Type": "application/json"}
    status, answer = with_headers(toy_server, "POST", "/api/predict", headers, drawing(BLANK))  # the demo's own page
    assert status == 422 and "no digit" in answer["error"]


def test_two_hundred_concurrent_requests_are_all_answered(toy_server):
    outcomes, start = [], threading.Barrier(200)

    def one() -> None:
        start.wait()
        try:
            outcomes.append(request(toy_server, "GET", "/api/models")[0])
        except OSError as err:  # a reset or a timeout: what a listen backlog of 5 gave
            outcomes.append(type(err).__name__)

    threads = [threading.Thread(target=one) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [200] * 200, sorted(set(map(str, outcomes)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("head", "body", "expected", "fragment"),
    [
        ("Content-Length: 100", b'{"image": "', 400, "ended after 11 of the 100 bytes"),
        ("Content-Length: 400000", b"[" * 200_000 + b"]" * 200_000, 400, "nests JSON too deeply"),
    ],
    ids=["body shorter than its length", "deep JSON"],
)
def test_malformed_requests_get_a_4xx_promptly_never_a_500(toy_server, head, body, expected, fragment):
    host = f"127.0.0.1:{toy_server.server_address[1]}"
    request_head = f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}"
    status, answer = raw(toy_server, request_head, body, timeout=15)
    assert status == expected and fragment in answer["error"], answer
    # the same length twice is one length
    length = len(drawing(BLANK))
    twice = f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    twice += f"Content-Length: {length}\r\nContent-Length: {length}"
    assert raw(toy_server, twice, drawing(BLANK))[0] == 422


LENGTH = len(drawing(BLANK))


@pytest.mark.parametrize(
    "head",
    [
        f"Content-Length: +{LENGTH}",
        f"Content-Length: {str(LENGTH)[0]}_{str(LENGTH)[1:]}",
        f"Content-Length:  {LENGTH} \r\nContent-Length: {LENGTH + 1}",
        f"Content-Length: 0x{LENGTH:x}",
        f"Transfer-Encoding: chunked\r\nContent-Length: {LENGTH}",
        "Transfer-Encoding: gzip",
    ],
)
def test_the_http_layer_refuses_malformed_framing_with_a_400(toy_server, head):
    """h11's strict parsing: lengths Python's int() accepts (`+N`, `1_0`), conflicting or mixed framing.

    The body is a whole blank drawing, which a server reading these lengths leniently answers 422.
    """
    host = f"127.0.0.1:{toy_server.server_address[1]}"
    request_head = f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}"
    with socket.create_connection(toy_server.server_address[:2], timeout=15) as sock:
        sock.sendall(request_head.encode() + b"\r\n\r\n" + drawing(BLANK))
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 400, (head, response.status, response.read())


def test_a_chunked_body_is_read_within_the_limit(toy_server):
    host = f"127.0.0.1:{toy_server.server_address[1]}"
    head = f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    body = drawing(BLANK)
    status, answer = raw(toy_server, head, f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    assert status == 422 and "no digit" in answer["error"]
    big = b"{" + b" " * MAX_BODY_BYTES + b"}"
    chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (big[:600_000], big[600_000:]))
    status, answer = raw(toy_server, head, chunks + b"0\r\n\r\n")
    assert status == 413 and str(MAX_BODY_BYTES) in answer["error"]


@pytest.mark.slow
def test_predicts_a_real_mnist_digit_sent_as_png(server, digit):
    image, label = digit
    status, answer = post(server, drawing(Image.fromarray(image.numpy())))
    assert status == 200
    (result,) = answer["models"]
    assert result["name"] == CHECKPOINT and result["digit"] == label and result["probability"] >= 0.99
    assert len(result["probabilities"]) == 10 and sum(result["probabilities"]) == pytest.approx(1, abs=1e-5)
    # the input shown is prepare_digit's output, as for `bnvit predict`
    expected = (prepare_digit(Image.fromarray(image.numpy()))[0] * 255).round().to(torch.uint8)
    assert torch.equal(torch.tensor(answer["input"], dtype=torch.uint8), expected)
    # drawn dark on white, as on the page's canvas: the same digit
    inverted = ImageOps.invert(Image.fromarray(image.numpy())).resize((280, 280), Image.BILINEAR)
    status, answer = post(server, drawing(inverted))
    assert status == 200 and answer["models"][0]["digit"] == label


# ---------------------------------------------------------------------------- the command line


@pytest.fixture
def no_serving(monkeypatch) -> list[DemoServer]:
    """`bnvit demo` returns instead of serving forever; the servers it built are kept for inspection."""
    built: list[DemoServer] = []

    def serve(server: DemoServer) -> None:
        built.append(server)
        server.server_close()

    monkeypatch.setattr(bnvit.app.demo, "serve", serve)
    return built


def test_cli_serves_a_checkpoint_and_a_comparison(no_serving, reference_checkpoints, capsys):
    vit = reference_checkpoints / "FinOptAug1_ViT_30.pth"
    assert (
        main(["demo", "--checkpoint", str(reference_checkpoints / CHECKPOINT), "--compare", str(vit), "--port", "0"])
        == 0
    )
    (server,) = no_serving
    assert [(m.name, m.description) for m in server.models] == [
        (CHECKPOINT, "ViTBNFFN, depth 5"),
        ("FinOptAug1_ViT_30.pth", "ViT (LayerNorm), depth 6"),
    ]
    assert server.server_address[0] == "127.0.0.1"
    assert f"open {server.url}" in capsys.readouterr().out


def test_cli_without_checkpoint_uses_the_shipped_weights_or_says_to_pass_one(no_serving, capsys):
    status = main(["demo", "--port", "0"])
    err = capsys.readouterr().err
    if status == 0:  # the package ships trained weights
        assert [m.name for m in no_serving[0].models] == ["vitbnffn_mnist"]
    else:
        assert status == 2 and not no_serving
        assert len(err.strip().splitlines()) == 1 and "pass --checkpoint PATH" in err


def test_the_probabilities_shown_are_calibrated_with_each_models_temperature(digit):
    """One model served twice, raw and at temperature 0.5: the same digit, the softmax of logits / T."""
    model = bnvit.for_inference(bnvit.ViTBNFFN(depth=1))
    image = Image.fromarray(digit[0].numpy())
    answer = bnvit.app.demo.classify_drawing(
        [DemoModel("raw", model), DemoModel("sharp", model, temperature=0.5)], image
    )
    raw, sharp = answer["models"]
    with torch.inference_mode():
        logits = model(prepare_digit(image)[None])[0]
    torch.testing.assert_close(torch.tensor(raw["probabilities"]), logits.softmax(0))
    torch.testing.assert_close(torch.tensor(sharp["probabilities"]), (logits / 0.5).softmax(0))
    assert raw["digit"] == sharp["digit"]
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            DemoModel("bad", model, temperature=bad)


def test_cli_serves_the_shipped_weights_at_their_temperature(no_serving):
    from bnvit.weights.calibration import shipped_temperature

    assert main(["demo", "--port", "0"]) == 0
    (served,) = no_serving[0].models
    assert served.temperature == shipped_temperature("vitbnffn_mnist") < 1


def test_cli_errors(no_serving, tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "file not found" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        torch.save(bnvit.ViTBNFFN(depth=1).state_dict(), tmp_path / "toy.pth")
        assert main(["demo", "--checkpoint", str(tmp_path / "toy.pth"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not no_serving


# ---------------------------------------------------------------------------- in a real browser


def test_strokes_cover_the_digit(digit):
    image, _ = digit
    strokes = strokes_from_digit(image)
    points = [p for stroke in strokes for p in stroke]
    assert all(len(s) in (1, 2) for s in strokes)
    assert max(abs(c) for p in points for c in p) <= 0.375  # inside the canvas, with a margin
    assert len({y for _, y in points}) == int((image >= 128).any(1).sum())  # one row of strokes per row of ink


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    if find_chromium() is None:
        pytest.skip(
            "Chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver; "
            "or set BNVIT_CHROMIUM and BNVIT_CHROMEDRIVER to their paths)"
        )
    from bnvit.app.demo.browser import start_chromium

    driver = start_chromium(1280, 900)
    yield driver
    driver.quit()


def _open(browser, server: DemoServer) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def _lit_pixels(browser) -> int:
    script = "return Array.from(document.getElementById('input').getContext('2d')"
    script += ".getImageData(0, 0, 28, 28).data).filter((v, i) => i % 4 === 0 && v > 0).length"
    return browser.execute_script(script)


@pytest.mark.timeout(120)  # a hung browser fails the test instead of the whole run
def test_drawing_a_digit_in_the_browser_shows_it_as_the_prediction(browser, server, digit, tmp_path):
    from selenium.webdriver.common.by import By

    from bnvit.app.demo.browser import draw_strokes, wait_for_answer

    image, label = digit
    _open(browser, server)
    assert wait_for_answer(browser) == [""]  # nothing drawn, nothing predicted
    strokes = strokes_from_digit(image)
    draw_strokes(browser, strokes)
    assert wait_for_answer(browser) == [str(label)]
    assert browser.find_element(By.ID, "canvas").get_attribute("data-pointer") == "mouse"
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "ready" and f"Prediction: {label}" in status.text
    assert browser.find_element(By.ID, "canvas").get_attribute("data-strokes") == str(len(strokes))
    assert _lit_pixels(browser) > 30  # the 28x28 input the model saw is shown
    tallest = browser.find_element(By.CSS_SELECTOR, ".column.top .label").text
    assert tallest == str(label)
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.find_element(By.ID, "undo").click()
    wait_for_answer(browser)
    assert browser.find_element(By.ID, "canvas").get_attribute("data-strokes") == str(len(strokes) - 1)
    browser.find_element(By.ID, "clear").click()
    assert wait_for_answer(browser) == [""]
    assert status.get_attribute("data-state") == "idle" and _lit_pixels(browser) == 0


@pytest.mark.timeout(120)  # a hung browser fails the test instead of the whole run
def test_drawing_with_a_finger(browser, server, digit):
    from selenium.webdriver.common.by import By

    from bnvit.app.demo.browser import draw_strokes, wait_for_answer

    image, label = digit
    _open(browser, server)
    draw_strokes(browser, strokes_from_digit(image), pointer="touch")
    assert wait_for_answer(browser) == [str(label)]
    assert browser.find_element(By.ID, "canvas").get_attribute("data-pointer") == "touch"


def test_a_drawing_that_is_not_one_digit_says_so(toy_server):
    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).line([(70, 40), (70, 240)], fill=0, width=20)
    status, answer = post(toy_server, drawing(image))
    assert status == 200 and answer["one_digit"] is True and answer["not_one_digit"] is None
    ImageDraw.Draw(image).line([(210, 40), (210, 240)], fill=0, width=20)  # "11"
    status, answer = post(toy_server, drawing(image))
    assert status == 200 and answer["one_digit"] is False
    assert "like a number" in answer["not_one_digit"] and 0 <= answer["models"][0]["digit"] <= 9


def test_cli_serves_shipped_weights_by_name(no_serving):
    from bnvit.weights.calibration import shipped_temperature

    assert main(["demo", "--model", "vitln_mnist", "--compare", "vitbnffn_mnist", "--port", "0"]) == 0
    served = no_serving[0].models
    assert [(m.name, m.description) for m in served] == [
        ("vitln_mnist", "ViT (LayerNorm), depth 6"),
        ("vitbnffn_mnist", "ViTBNFFN, depth 6"),
    ]
    assert [m.temperature for m in served] == [
        shipped_temperature("vitln_mnist"),
        shipped_temperature("vitbnffn_mnist"),
    ]
