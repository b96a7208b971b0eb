"""`lmforge serve` against an attacker: cross-site requests, foreign Host headers, bodies too large to hold,
requests that would stall the event loop, clients that hang up, and errors that echo the request back.

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
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from pydantic import ValidationError  # noqa: E402
from test_server import HELLO, MODEL, LiveServer, build_model_dir, free_port  # noqa: E402

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.guard import allowed_host_names, host_name  # noqa: E402
from lmforge.infer.openai_api import (  # noqa: E402
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    excerpt,
)
from lmforge.infer.serve import DEFAULT_MAX_BODY_BYTES  # noqa: E402

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


# -- 3. bodies too large, and huge requests beside small ones -------------------------------------------------


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


def test_a_huge_request_does_not_hold_up_small_ones(live, monkeypatch):
    """While the tokenizer works through a 2 MB /tokenize (no API key needed there), /health and a short
    completion are answered: tokenizing runs in a worker thread, and the tokenizer releases the GIL."""
    tokenizer = live.engine.tokenizer
    text = ("The quick brown fox jumps over the lazy dog; 3 + 4 = 7. Café 😀 " * 40_000)[:1_900_000]
    assert len(json.dumps({"prompt": text}, ensure_ascii=False).encode()) < DEFAULT_MAX_BODY_BYTES
    started, timeline = threading.Event(), {}
    encode = tokenizer.encode

    def watched_encode(text, *args, **kwargs):
        if len(text) < 100_000:
            return encode(text, *args, **kwargs)
        started.set()
        try:
            return encode(text, *args, **kwargs)
        finally:
            timeline["big encoded"] = time.perf_counter()

    monkeypatch.setattr(tokenizer, "encode", watched_encode)
    big_answer = {}
    big = threading.Thread(target=lambda: big_answer.update(
        httpx.post(live.url + "/tokenize", json={"prompt": text}, timeout=120).json()))
    big.start()
    assert started.wait(60), "the big request never reached the tokenizer"
    assert httpx.get(live.url + "/health", timeout=60).status_code == 200
    timeline["health answered"] = time.perf_counter()
    completion = live.client(timeout=60).completions.create(model=MODEL, prompt="The quick", max_tokens=2)
    timeline["completion answered"] = time.perf_counter()
    big.join(120)
    assert completion.choices[0].finish_reason
    assert timeline["completion answered"] < timeline["big encoded"], timeline  # and /health before it
    assert big_answer["count"] == len(big_answer["tokens"]) > live.engine.max_len  # vLLM's: no context bound


class CountingBackend:
    """Stands in for a Tokenizer's `backend` (the `tokenizers` object), recording the longest text any
    encode call was given."""

    def __init__(self, backend):
        self.backend, self.longest = backend, 0

    def __getattr__(self, name):
        attribute = getattr(self.backend, name)
        if name not in ("encode", "encode_batch", "encode_batch_fast"):
            return attribute

        def encode(texts, *args, **kwargs):
            self.longest = max(self.longest, *map(len, [texts] if isinstance(texts, str) else texts))
            return attribute(texts, *args, **kwargs)

        return encode


def test_text_that_cannot_fit_the_context_is_refused_before_it_is_tokenized(live, monkeypatch):
    """A 1 MB chat or prompt cannot fit a 1024-token context: its length alone says so (Tokenizer.min_tokens),
    so the tokenizer never sees it (tokenizing it took seconds of every stream's time)."""
    tokenizer = live.engine.tokenizer
    assert tokenizer.max_chars_per_token  # a bound holds for this tokenizer (BPE, byte-level)
    counting = CountingBackend(tokenizer.backend)
    monkeypatch.setattr(tokenizer, "backend", counting)
    huge = "To be, or not to be. " * 50_000
    cases = [("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": huge}]}, "messages"),
             ("/v1/completions", {**COMPLETION, "prompt": huge}, "prompt"),
             ("/v1/completions", {**COMPLETION, "prompt": ["hi", huge]}, "prompt")]
    for path, body, param in cases:
        error = error_of(httpx.post(live.url + path, json=body, timeout=60), 400)
        assert (error["param"], error["code"]) == (param, "context_length_exceeded"), error
        assert "1024 tokens" in error["message"] and len(error["message"]) < 300
    assert counting.longest < 1000
    assert live.client().completions.create(model=MODEL, prompt="hi", max_tokens=1).choices  # still tokenizes


def test_chat_prompt_ids_are_the_template_rendering_tokenized(live, model_dir):
    """The server tokenizes the rendered chat (render_chat + encode) rather than through encode_chat, whose
    assistant mask it does not need: the same ids, for a chat with assistant turns, as encode_chat and as
    transformers' apply_chat_template."""
    from transformers import AutoTokenizer

    chat = [*HELLO, {"role": "assistant", "content": "Hi. Café 😀"}, {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Nothing."}, {"role": "user", "content": "Fine."}]
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    for generation_prompt in (True, False):
        expected = reference.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True,
                                                 return_dict=True)["input_ids"]
        assert live.engine.tokenizer.encode_chat(chat, add_generation_prompt=generation_prompt)[0] == expected
        answer = httpx.post(live.url + "/tokenize", json={"messages": chat,
                                                          "add_generation_prompt": generation_prompt}).json()
        assert answer["tokens"] == expected


def test_a_batch_of_prompts_and_the_lists_each_prompt_carries_are_bounded(serve):
    """Each prompt of a batch is an engine request, whose sampling parameters the engine checks: a megabyte of
    logit_bias or stop_token_ids times a thousand prompts kept the event loop for minutes."""
    server = serve(max_prompts=3)
    for prompt in (["a"] * 4, [[1]] * 4):
        error = error_of(httpx.post(server.url + "/v1/completions", json={**COMPLETION, "prompt": prompt}), 400)
        assert error["param"] == "prompt" and "--max-prompts" in error["message"]
    bias = {str(i): -1 for i in range(301)}
    for param, value in [("logit_bias", bias), ("stop_token_ids", [*range(301)])]:
        response = httpx.post(server.url + "/v1/completions", json={**COMPLETION, param: value})
        assert error_of(response, 400)["param"] == param and "at most 300" in response.text
    answer = server.client().completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=1,
                                                logit_bias=dict(list(bias.items())[:300]),
                                                extra_body={"stop_token_ids": [*range(300)]})
    assert len(answer.choices) == 3


def test_a_body_of_a_million_bad_values_is_one_error():
    """Pydantic makes an error per bad value: a list of a million of them took seconds to validate and
    report, on the event loop. Lists stop at their first bad item, models at their first unknown field."""
    bad = 100_000
    bodies = [
        (DetokenizeRequest, {"tokens": ["a"] * bad}),
        (ChatCompletionRequest, {**CHAT, "messages": [1] * bad}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [{"type": "x"}] * bad}]}),
        (ChatCompletionRequest, {**CHAT, **{f"unknown{i}": 1 for i in range(bad)}}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", **{f"x{i}": 1 for i in range(bad)}}]}),
        (CompletionRequest, {**COMPLETION, "prompt": [["a"]] * bad}),
        (CompletionRequest, {**COMPLETION, "prompt": [1] + ["a"] * bad}),
        (CompletionRequest, {**COMPLETION, "stop": [1] * bad}),
        (CompletionRequest, {**COMPLETION, "stop_token_ids": ["a"] * bad}),
        (CompletionRequest, {**COMPLETION, "logit_bias": {str(i): "a" for i in range(bad)}}),
        (TokenizeRequest, {"messages": [{"role": "robot"}] * bad}),
    ]
    for schema, body in bodies:
        try:
            schema.model_validate_json(json.dumps(body))
        except ValidationError as e:
            assert e.error_count() <= 4, (schema.__name__, e.error_count())
        else:
            assert "logit_bias" in body  # its values are checked by the server, entry by entry


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


def test_retrieve_model(live):
    """OpenAI's GET /v1/models/{id}: the model object /v1/models lists; another id is a 404."""
    client = live.client()
    (listed,) = client.models.list().data
    assert client.models.retrieve(MODEL) == listed
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-17")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


HUGE = "x" * 100_000
ECHO_CASES = [
    # (name, path, body, param, what the message names): the culprit, and none of the request's bulk
    ("logit_bias token out of vocabulary", "/v1/chat/completions",
     {**CHAT, "logit_bias": {**{str(i): 1 for i in range(250)}, "100000": 1}}, "logit_bias", "'100000'"),
    ("logit_bias key not a token id", "/v1/completions", {**COMPLETION, "logit_bias": {HUGE: 1}}, "logit_bias",
     excerpt(HUGE)),
    ("logit_bias bias out of range", "/v1/completions",
     {**COMPLETION, "logit_bias": {**{str(i): 1 for i in range(250)}, "7": 101}}, "logit_bias.7", "'logit_bias.7'"),
    ("logit_bias bias not a number", "/v1/completions", {**COMPLETION, "logit_bias": {"7": [HUGE]}}, "logit_bias.7",
     "'logit_bias.7'"),
    ("n above the engine's slots", "/v1/chat/completions", {**CHAT, "n": 5}, "n", "at most 4"),
    ("stop_token_ids out of vocabulary", "/v1/completions",
     {**COMPLETION, "stop_token_ids": [*range(299), 10**6]}, "stop_token_ids", "1000000 is not"),
    ("prompt token out of vocabulary", "/v1/completions", {**COMPLETION, "prompt": [1] * 900 + [10**6]}, "prompt",
     "1000000 is not"),
    ("detokenize token out of vocabulary", "/detokenize", {"tokens": [1] * 50_000 + [-1]}, "tokens", "-1 is not"),
    ("unknown field with a huge name", "/v1/completions", {**COMPLETION, HUGE: 1}, excerpt(HUGE), excerpt(HUGE)),
    ("unknown field in a message", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "hi", HUGE: 1}]}, f"messages.0.{excerpt(HUGE)}",
     excerpt(HUGE)),
    ("huge model name", "/v1/completions", {**COMPLETION, "model": HUGE}, "model", excerpt(HUGE)),
    ("huge model name to retrieve", "/v1/models/" + "y" * 5000, None, "model", excerpt("y" * 5000)),
    ("bad item in a long list", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": HUGE}] * 5 + [{"role": "robot"}]}, "messages.5.role",
     "'messages.5.role'"),
]


@pytest.mark.parametrize("name,path,body,param,named", ECHO_CASES, ids=[case[0] for case in ECHO_CASES])
def test_errors_name_the_culprit_without_echoing_the_request(live, name, path, body, param, named):
    response = httpx.get(live.url + path) if body is None else httpx.post(live.url + path, json=body, timeout=30)
    assert response.status_code in (400, 404) and len(response.content) < 600, response.text[:600]
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"], error


# -- the command line: its flags reach the server, and a hang-up is one line of its log ------------------------


def test_cli_serve_security_flags_and_log(model_dir, tmp_path):
    port = free_port()
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_dir),
                                    "--port", str(port), "--max-batch-size", "2", "--allowed-hosts", "lmforge.test",
                                    "--max-body-bytes", "2000", "--max-prompts", "2", "--name", MODEL],
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
        response = httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c"]})
        assert error_of(response, 400)["param"] == "prompt"
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
    for flag in ("--allowed-hosts", "--max-body-bytes", "--max-prompts"):
        assert flag in usage.stdout
    refused = subprocess.run([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_dir),
                              "--max-body-bytes", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "max_body_bytes: 0 is out of range" in refused.stderr
