"""Images from the user's side: `lmforge generate --image`, `lmforge chat`'s /image, and `lmforge serve`'s OpenAI
`image_url` content parts through the official `openai` client, attacked (a huge data URL, a bomb, non-image bytes,
files outside the allowed directory, file:///etc/passwd, web URLs off by default, a local HTTP server that streams
forever or is slow, an image for a text-only model). The models have random weights: the tests check the plumbing
(the reply and its tokens' log-probs are the engine's own for the same ids and images, the prompt counts the image
tokens), not the content. A random model's greedy text hardly depends on the image, its log-probs do.
vision/fetch.py's policy alone is attacked in test_image_fetch.py."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image
from test_image_fetch import bomb_png
from test_server import MODEL, LiveServer, build_model_dir
from vlm_helpers import picture, tiny_llava_dir

from lmforge.cli import main as cli
from lmforge.infer.engine import Engine
from lmforge.infer.llm import encode_chat_images
from lmforge.infer.sampling import SamplingParams
from lmforge.vision.fetch import ImagePolicy

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_serve")
    llava = tiny_llava_dir(root)
    images = root / "images"
    images.mkdir()
    for seed in (1, 2):
        picture(seed).save(images / f"p{seed}.png")
    (images / "junk.png").write_bytes(b"%PDF-1.4 not an image")
    (images / "bomb.png").write_bytes(bomb_png())
    (root / "secret.png").write_bytes(png(picture(9)))
    engine = Engine.from_pretrained(llava, max_batch_size=4)
    return {"root": root, "llava": llava, "images": images, "engine": engine,
            "image_tokens": engine.vision.config.image_seq_length}


GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def expected(engine: Engine, messages: list[dict], images: list[Image.Image]) -> tuple[str, int, list[float]]:
    """The engine's own greedy reply to the chat (images as PIL content parts): its text, the expanded prompt's
    length, its tokens' log-probs."""
    parts = [{"type": "image", "image": image} for image in images]
    chat = [{**m, "content": parts + [{"type": "text", "text": m["content"]}]} if m["role"] == "user" and parts
            else m for m in messages]
    ids, shown = encode_chat_images(engine.tokenizer, chat)
    return run(engine, ids, shown)


def run(engine: Engine, ids: list[int], images: list[Image.Image]) -> tuple[str, int, list[float]]:
    request = engine.submit(ids, SamplingParams(**GREEDY, logprobs=True), images)
    list(request)
    output = request.outputs[0]
    return output.text, len(request.prompt), [lp.logprob for lp in output.logprobs]


def test_the_images_make_a_difference(world):
    """The check the others rely on: a different image, or none, changes the reply's log-probs."""
    engine, question = world["engine"], [{"role": "user", "content": "What colour?"}]
    shown = [expected(engine, question, images)[2] for images in ([picture(1)], [picture(2)], [])]
    assert max(abs(a - b) for a, b in zip(shown[0], shown[1])) > 1e-3
    assert max(abs(a - b) for a, b in zip(shown[0], shown[2])) > 1e-3


# -- generate and chat ----------------------------------------------------------------------------------------


def generated(capsys) -> tuple[str, list[float], int]:
    """What `lmforge generate --logprobs` printed: the text, its tokens' log-probs, the prompt's token count
    (with --prompt-logprobs)."""
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    return (captured.out.removesuffix("\n"), [line["logprob"] for line in lines if not line.get("prompt")],
            sum(1 for line in lines if line.get("prompt")))


def test_generate_with_images(world, capsys):
    engine, images = world["engine"], world["images"]
    p1, p2 = Image.open(images / "p1.png"), Image.open(images / "p2.png")
    flags = ["--model", str(world["llava"]), "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos",
             "--logprobs", "--prompt-logprobs", "0"]
    # --chat: the images before the text in the user message
    assert cli(["generate", *flags, "--chat", "--prompt", "What colour?", "--image", str(images / "p1.png"),
                str(images / "p2.png")]) == 0
    text, prompt_len, logprobs = expected(engine, [{"role": "user", "content": "What colour?"}], [p1, p2])
    out, got, prompt_tokens = generated(capsys)
    assert out == text and got == pytest.approx(logprobs, abs=1e-4) and prompt_tokens == prompt_len
    # a plain prompt: its <image> placeholders, or the images put in front of it
    text, prompt_len, logprobs = run(engine, engine.tokenizer.encode("<image>\nIt is"), [p1])
    for prompt in ("<image>\nIt is", "It is"):
        assert cli(["generate", *flags, "--prompt", prompt, "--image", str(images / "p1.png")]) == 0
        out, got, prompt_tokens = generated(capsys)
        assert out == text and got == pytest.approx(logprobs, abs=1e-4) and prompt_tokens == prompt_len


def test_generate_image_errors_are_one_line(world, tmp_path, capsys):
    flags = ["--model", str(world["llava"]), "--max-new-tokens", "2", "--prompt", "Hi"]
    for image, message in ((tmp_path / "missing.png", "missing.png: no such file"),
                           (world["images"] / "junk.png", "junk.png: not a readable image"),
                           (world["images"] / "bomb.png", "over the limit")):
        assert cli(["generate", *flags, "--image", str(image)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmforge generate: error: ") and message in err and "\n" not in err
    # two placeholders, one image
    assert cli(["generate", *flags[:-1], "<image><image>Hi", "--image", str(world["images"] / "p1.png")]) == 2
    assert "2 image placeholders" in capsys.readouterr().err


def test_generate_text_model_refuses_images(world, tmp_path, capsys):
    text_model = build_model_dir(tmp_path)
    assert cli(["generate", "--model", str(text_model), "--prompt", "Hi", "--max-new-tokens", "2",
                "--image", str(world["images"] / "p1.png")]) == 2
    assert "no vision tower" in capsys.readouterr().err


def test_chat_image_command(world, monkeypatch, capsys):
    engine, images = world["engine"], world["images"]
    lines = iter([f"/image {images / 'p1.png'}", "/image nowhere.png", f"/image {images / 'junk.png'}",
                  "What colour?", "And now?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli(["chat", "--model", str(world["llava"]), "--temperature", "0", "--max-new-tokens", "6",
                "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert "p1.png attached to your next message: 1 image" in out
    assert "(nowhere.png: no such file)" in out and "junk.png: not a readable image" in out
    p1 = Image.open(images / "p1.png")
    first, first_len, _ = expected(engine, [{"role": "user", "content": "What colour?"}], [p1])
    assert f"assistant> {first}\n" in out and f"prompt {first_len} tokens" in out
    # the next turn keeps the image in the history (its tokens counted again), without a new one
    history = [{"role": "user", "content": [{"type": "image", "image": p1}, {"type": "text", "text": "What colour?"}]},
               {"role": "assistant", "content": first}, {"role": "user", "content": "And now?"}]
    ids, shown = encode_chat_images(engine.tokenizer, history)
    assert f"prompt {len(ids) + world['image_tokens'] - 1} tokens" in out and len(shown) == 1


def test_chat_text_model_has_no_image_command(tmp_path, monkeypatch, capsys):
    text_model = build_model_dir(tmp_path)
    lines = iter(["/image x.png", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli(["chat", "--model", str(text_model)]) == 0
    assert "no vision tower" in capsys.readouterr().out


# -- serve ------------------------------------------------------------------------------------------------------


class Attacker(BaseHTTPRequestHandler):
    """A web server an image URL may point to: a good image, endless bytes, a slow trickle."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        try:
            self.send_response(200)
            if self.path == "/p1.png":
                body = self.server.image
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.end_headers()
            while True:  # /forever: as fast as it goes; /slow: a byte at a time
                self.wfile.write(b"\0" * (65536 if self.path == "/forever" else 1))
                self.wfile.flush()
                if self.path == "/slow":
                    threading.Event().wait(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def web(world):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    server.daemon_threads = True
    server.image = (world["images"] / "p1.png").read_bytes()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def live(world):
    """The llava model served with local files under its images folder and web URLs on (loopback allowed,
    for the local attacker; 100 kB, 2 s)."""
    engine = world["engine"]
    engine.start()
    policy = ImagePolicy(files=world["images"], web=True, private_hosts=True, max_bytes=100_000, timeout=2.0)
    server = LiveServer.start(engine, images=policy, max_body_bytes=4 * 2**20)
    yield server
    server.close()
    engine.stop()


def user(*parts) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": p}} if not p.startswith("TEXT:")
               else {"type": "text", "text": p[5:]} for p in parts]
    return [{"role": "user", "content": content}]


def ask(live, messages, **options):
    return live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, extra_body={"ignore_eos": True}, **options)


def logprobs_of(reply) -> list[float]:
    return [entry.logprob for entry in reply.choices[0].logprobs.content]


def bad_request(live, messages, param: str, message: str) -> str:
    with pytest.raises(openai.BadRequestError) as error:
        ask(live, messages)
    body = error.value.body
    assert body["param"] == param, body
    assert message in body["message"] and "\n" not in body["message"], body
    return body["message"]


def test_serve_image_parts(world, live, web):
    images = world["images"]
    p1 = Image.open(images / "p1.png")
    text, prompt_len, logprobs = expected(world["engine"], [{"role": "user", "content": "What colour?"}], [p1])
    by_data = ask(live, user(data_url((images / "p1.png").read_bytes()), "TEXT:What colour?"))
    assert by_data.choices[0].message.content == text
    assert logprobs_of(by_data) == pytest.approx(logprobs, abs=1e-4)
    assert by_data.usage.prompt_tokens == prompt_len  # the image's tokens counted
    # the same image as a file (relative to the image directory, absolute, file://) and as a web URL
    for url in ("p1.png", str(images / "p1.png"), (images / "p1.png").as_uri(), f"{web}/p1.png"):
        reply = ask(live, user(url, "TEXT:What colour?"))
        assert reply.choices[0].message.content == text and reply.usage.prompt_tokens == prompt_len
        assert logprobs_of(reply) == pytest.approx(logprobs, abs=1e-4)
    # streamed, with a usage chunk
    stream = ask(live, user("p1.png", "TEXT:What colour?"), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx(logprobs, abs=1e-4)
    assert chunks[-1].usage.prompt_tokens == prompt_len
    # two images and an "auto" detail; a text-only chat still works on the same server
    two = ask(live, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "p1.png", "detail": "auto"}},
        {"type": "image_url", "image_url": {"url": "p2.png"}}, {"type": "text", "text": "Same?"}]}])
    _, prompt_len, logprobs = expected(world["engine"], [{"role": "user", "content": "Same?"}],
                                       [p1, Image.open(images / "p2.png")])
    assert two.usage.prompt_tokens == prompt_len and logprobs_of(two) == pytest.approx(logprobs, abs=1e-4)
    assert ask(live, [{"role": "user", "content": "Hello"}]).choices[0].message.content is not None
    assert live.wait_idle() == 0


def test_serve_refuses_bad_images(world, live, web):
    url = "messages.0.content.0.image_url.url"
    bad_request(live, user("../secret.png", "TEXT:Hi"), url, "outside the directory")
    bad_request(live, user(str(world["root"] / "secret.png")), url, "outside the directory")
    bad_request(live, user("file:///etc/passwd"), url, "outside the directory")
    bad_request(live, user("junk.png"), url, "not a readable image")
    bad_request(live, user("bomb.png"), url, "over the limit")
    bad_request(live, user(data_url(bomb_png())), url, "over the limit")
    bad_request(live, user(data_url(b"GIF89a" + b"\0" * 100)), url, "not a readable image")
    huge = data_url(b"\0" * 200_000)  # over the server's 100 kB image limit, within its 4 MB body limit
    message = bad_request(live, user(huge), url, "more than 100000 bytes")
    assert len(message) < 400
    bad_request(live, user(f"{web}/forever"), url, "more than the 100000 bytes")
    bad_request(live, user(f"{web}/slow"), url, "not fetched within 2 s")
    bad_request(live, user("ftp://example.com/a.png"), url, "a ftp: URL")
    # the second part of the second message names itself
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": [
        {"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": "nope.png"}}]}]
    bad_request(live, messages, "messages.1.content.1.image_url.url", "no such file")
    # images are a user's
    bad_request(live, [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "p1.png"}}]},
                       {"role": "user", "content": "Hi"}], url, "user messages only")
    # the schema: a part without a url, an unknown part type, an unknown field
    bad_request(live, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], url, "Missing")
    bad_request(live, [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "messages.0.content.0",
                "a content part is")
    bad_request(live, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "p1.png", "x": 1}}]}],
                "messages.0.content.0.image_url.x", "Unrecognized request argument")
    bad_request(live, user(*["p1.png"] * 9), "messages.0.content.8.image_url.url", "at most 8 images")
    assert live.wait_idle() == 0 and live.healthy()


def test_serve_defaults_read_no_web_urls(world, live, web):
    """create_app's default: data URLs only; with web URLs on, those to loopback refused unless allowed."""
    engine = live.engine
    defaults = LiveServer.start(engine)
    files = LiveServer.start(engine, images=ImagePolicy(files=world["images"], web=True))
    try:
        url = "messages.0.content.0.image_url.url"
        bad_request(defaults, user("p1.png"), url, "reads no local files")
        bad_request(defaults, user(f"{web}/p1.png"), url, "does not fetch web URLs")
        assert ask(defaults, user(data_url((world["images"] / "p1.png").read_bytes()))).choices
        assert ask(files, user("p1.png")).choices
        bad_request(files, user(f"{web}/p1.png"), url, "loopback, private or reserved address")
    finally:
        defaults.close()
        files.close()


def test_text_model_says_it_has_no_vision_tower(tmp_path):
    text_model = build_model_dir(tmp_path)
    engine = Engine.from_pretrained(text_model, max_batch_size=2)
    engine.start()
    server = LiveServer.start(engine)
    try:
        png_url = data_url(png(picture(1)))
        bad_request(server, user(png_url, "TEXT:Hi"), "messages.0.content.0.image_url.url", "has no vision tower")
        response = httpx.post(server.url + "/tokenize", json={"messages": user(png_url)})  # the tokenizer's too
        assert response.status_code == 400 and "no vision tower" in response.json()["error"]["message"]
    finally:
        server.close()
        engine.stop()


def test_tokenize_counts_image_placeholders(world, live):
    response = httpx.post(live.url + "/tokenize", json={"messages": user("nope.png", "TEXT:Hi")})
    assert response.status_code == 200  # images are not read to tokenize
    image_id = world["engine"].vision.config.image_token_index
    assert response.json()["tokens"].count(image_id) == 1


def test_images_are_read_on_their_own_threads(world, live, monkeypatch):
    """A request's images are read on the server's image threads, so slow ones never occupy the threads that
    render other requests' prompts."""
    from lmforge.infer import chat_api

    threads = []
    read = chat_api.fetch_image

    def recording(url, policy):
        threads.append(threading.current_thread().name)
        return read(url, policy)

    monkeypatch.setattr(chat_api, "fetch_image", recording)
    url = data_url((world["images"] / "p1.png").read_bytes())
    assert ask(live, user(url, url, "TEXT:What colour?")).choices
    assert len(threads) == 2 and all(name.startswith("lmforge-images") for name in threads), threads
