"""`lmforge serve` against an attacker: cross-site requests, foreign Host headers, bodies too large to hold,
clients that hang up, and routes probed without the API key.

The servers run in threads over one tiny random model, as in test_server.py; one test runs the real command
in a subprocess, for its flags and its log. Timings are only ever compared within a test, never to a
number of seconds, so a slow or loaded machine changes nothing but how long the tests take.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_server import MODEL, LiveServer, build_model_dir, free_port  # noqa: E402

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.server import allowed_host_names, host_name  # noqa: E402

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
JSON_ENDPOINTS = [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION), ("/tokenize", {"prompt": "hi"}),
                  ("/detokenize", {"tokens": [1, 2]})]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("security"))


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = Engine.from_pretrained(model_dir, max_batch_size=4)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def live(engine):
    server = LiveServer.start(engine)
    yield server
    server.close()


@pytest.fixture
def serve(engine):
    """Start a server over the shared engine with create_app's options; stopped at the test's end."""
    servers = []

    def start(**options) -> LiveServer:
        servers.append(LiveServer.start(engine, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def raw_exchange(url: str, head: bytes, body: bytes = b"", timeout: float = 5) -> bytes:
    """Send `head` (request line and headers, without the blank line) and `body` over a socket, the
    connection left open; the server's answer, as far as it came within `timeout`."""
    host, port = url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(head + b"\r\n\r\n" + body)
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < content_length(answer):
            try:
                received = connection.recv(65536)
            except TimeoutError:
                break
            if not received:
                break
            answer += received
    return answer


def content_length(answer: bytes) -> int:
    head = answer.partition(b"\r\n\r\n")[0].lower()
    return int(head.partition(b"content-length:")[2].split(b"\r\n")[0] or 0)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# -- 2. cross-site requests: Content-Type and Host ------------------------------------------------------------


@pytest.mark.parametrize("path,body", JSON_ENDPOINTS, ids=[path for path, _ in JSON_ENDPOINTS])
def test_json_endpoints_take_only_json_bodies(live, path, body):
    """A web page can POST text/plain (or a form) to 127.0.0.1 without the browser asking first; such a body
    is never read, whatever it holds. JSON declared with a charset is JSON."""
    raw = json.dumps(body).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/jsonp", None):
        headers = {"content-type": content_type} if content_type else {}
        error = error_of(httpx.post(live.url + path, content=raw, headers=headers, timeout=30), 415)
        assert "application/json" in error["message"] and error["code"] == "unsupported_media_type"
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON ;charset=UTF-8"):
        response = httpx.post(live.url + path, content=raw, headers={"content-type": content_type}, timeout=30)
        assert response.status_code == 200, (content_type, response.text)
    assert live.wait_idle() == 0


def test_loopback_server_answers_only_loopback_host_names(live):
    """DNS rebinding: a page on evil.example, its name then pointed at 127.0.0.1, reaches the server with
    `Host: evil.example`. Every route refuses it, the web chat and /health included."""
    for host in ("localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1", "127.0.0.1:80", "127.5.6.7:1",
                 "[::1]", "[::1]:8000"):
        assert httpx.get(live.url + "/health", headers={"host": host}).status_code == 200, host
    evil = {"host": "evil.example:" + live.url.rsplit(":", 1)[1]}
    for method, path in [("GET", "/health"), ("GET", "/"), ("GET", "/web/app.js"), ("GET", "/v1/models"),
                         ("GET", "/tokenizer_info"), ("POST", "/tokenize"), ("POST", "/v1/chat/completions")]:
        response = httpx.request(method, live.url + path, json=CHAT, headers=evil)
        error = error_of(response, 403)
        assert error["code"] == "host_not_allowed" and "--allowed-hosts evil.example" in error["message"], path
    for host in ("127.0.0.1.evil.example", "localhost.evil.example", "[::2]", "0.0.0.0", "::1"):
        assert httpx.get(live.url + "/health", headers={"host": host}).status_code == 403, host
    # HTTP/1.0 allows no Host at all; a browser always sends one, so its absence is no rebinding.
    assert raw_exchange(live.url, b"GET /health HTTP/1.0").startswith(b"HTTP/1.1 200")


def test_allowed_hosts_add_names(serve):
    named = serve(allowed_hosts=["lmforge.test", "Other.Test:9"])
    for host, status in [("lmforge.test", 200), ("LMFORGE.TEST:1234", 200), ("other.test", 200),
                         ("localhost:1", 200), ("evil.example", 403)]:
        assert httpx.get(named.url + "/health", headers={"host": host}).status_code == status, host
    anything = serve(allowed_hosts=["*"])
    assert httpx.get(anything.url + "/health", headers={"host": "evil.example"}).status_code == 200


def test_which_hosts_each_bind_address_checks():
    """Bound to loopback: only loopback names, unless told more; bound to the network (where names are many
    and unknown), the Host is checked only when --allowed-hosts is given."""
    for bind in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert allowed_host_names(bind, []) == frozenset(), bind
        assert allowed_host_names(bind, ["a.test"]) == {"a.test"}, bind
        assert allowed_host_names(bind, ["a.test", "*"]) is None, bind
    for bind in ("0.0.0.0", "::", "192.168.1.5", "myhost.lan"):
        assert allowed_host_names(bind, []) is None, bind
        assert allowed_host_names(bind, ["myhost.lan:8000"]) == {"myhost.lan"}, bind
    assert [host_name(h) for h in ("[::1]:8000", "Example.COM.:80", "a:b", "[::1")] == ["::1", "example.com", "a:b",
                                                                                         "[::1"]


# -- 3. bodies too large -------------------------------------------------------------------------------------


def test_bodies_over_the_cap_are_refused_as_they_arrive(serve):
    """A declared Content-Length over the cap is refused before a byte of the body is read; a chunked body
    (no length declared) as soon as its count passes the cap, while the client is still sending it."""
    server = serve(max_body_bytes=64 * 1024)
    head = b"POST /tokenize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    reply = raw_exchange(server.url, head + b"Content-Length: 10000000")  # no body sent at all
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b" " * 16 * 1024)
    reply = raw_exchange(server.url, head + b"Transfer-Encoding: chunked", chunk * 5)  # never ended
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"--max-body-bytes" in reply and b"65536 bytes" in reply
    # What an ordinary client sees: the error, both ways.
    big = json.dumps({"prompt": "x" * 70_000}).encode()
    error = error_of(httpx.post(server.url + "/tokenize", content=big, headers={"content-type": "application/json"}),
                     413)
    assert error["code"] == "request_too_large"
    pieces = (big[i:i + 4096] for i in range(0, len(big), 4096))  # an iterator: httpx sends it chunked
    response = httpx.post(server.url + "/tokenize", content=pieces, headers={"content-type": "application/json"})
    assert error_of(response, 413)["code"] == "request_too_large"
    fits = json.dumps({"prompt": "x" * 60_000}).encode()
    assert httpx.post(server.url + "/tokenize", content=fits, headers={"content-type": "application/json"}).json()[
        "count"] > 0
    assert server.healthy()


# -- 6. a client that hangs up --------------------------------------------------------------------------------


def test_a_client_that_hangs_up_is_one_log_line(live, caplog):
    caplog.set_level(logging.INFO, logger="lmforge.infer.server")
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000")
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(head + b"\r\n\r\n" + b'{"model": "tiny-chat", "mess')
    deadline = time.monotonic() + 10
    while not any("closed the connection" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.02)
    with httpx.stream("POST", live.url + "/v1/completions", json={**COMPLETION, "max_tokens": 500, "stream": True,
                                                                 "ignore_eos": True}) as stream:
        next(stream.iter_lines())  # then hang up mid-stream
    assert live.wait_idle() == 0
    records = [r for r in caplog.records if r.name == "lmforge.infer.server"]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records), records
    (record,) = [r for r in records if "POST /v1/chat/completions" in r.getMessage()]
    assert "closed the connection" in record.getMessage()


# -- 11. API gaps ---------------------------------------------------------------------------------------------


def test_with_an_api_key_every_v1_path_is_401_first(serve):
    """vLLM's order: a client without the key learns nothing of the routes (not 404, 405 or 307)."""
    server = serve(api_key="sekret")
    key = {"authorization": "Bearer sekret"}
    for method, path, with_key in [("GET", "/v1/nothing-here", 404), ("POST", "/v1/nothing-here", 404),
                                   ("POST", "/v1/completions/", 307), ("GET", "/v1/chat/completions", 405),
                                   ("GET", "/v1", 404), ("GET", "/v1/models", 200)]:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
            response = httpx.request(method, server.url + path, headers=headers)
            assert error_of(response, 401)["code"] == "invalid_api_key", (method, path, headers)
        assert httpx.request(method, server.url + path, headers=key).status_code == with_key, (method, path)
    assert httpx.get(server.url + "/health").status_code == 200  # outside /v1: no key


# -- the command line: its flags reach the server, and a hang-up is one line of its log ------------------------


def test_cli_serve_security_flags_and_log(model_dir, tmp_path):
    port = free_port()
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_dir),
                                    "--port", str(port), "--max-batch-size", "2", "--allowed-hosts", "lmforge.test",
                                    "--max-body-bytes", "2000", "--name", MODEL],
                                   stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, log_file.read_text()
                time.sleep(0.1)
        assert httpx.get(url + "/health", headers={"host": f"lmforge.test:{port}"}).status_code == 200
        assert httpx.get(url + "/health", headers={"host": "evil.example"}).status_code == 403
        assert httpx.post(url + "/tokenize", json={"prompt": "x" * 3000}).status_code == 413
        with socket.create_connection(("127.0.0.1", port)) as connection:  # a body cut short
            connection.sendall(b"POST /tokenize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        deadline = time.monotonic() + 10
        while "closed the connection" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=30)
    log = log_file.read_text()
    assert log.count("closed the connection") == 1 and "Traceback" not in log and "ERROR" not in log, log
    usage = subprocess.run([sys.executable, "-m", "lmforge.cli", "serve", "--help"], capture_output=True, text=True)
    for flag in ("--allowed-hosts", "--max-body-bytes"):
        assert flag in usage.stdout
