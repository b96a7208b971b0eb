"""The web chat's images, in a real browser (headless Chromium driven by Playwright, as test_web_chat.py): an image
attached with the Image button is shown before sending, sent as a data URL content part with the text, shown in the
conversation, and sent again with the history; a file that is no image is refused in the page; a large image is
redrawn smaller before it is sent. The server holds a random tiny llava model (test_vlm_serve.py's)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api")
import test_web_chat  # noqa: E402
from test_web_chat import CHROMIUM, open_chat, wait_until  # noqa: E402

if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (Debian's `chromium` package) to drive", allow_module_level=True)

from test_server import LiveServer  # noqa: E402
from vlm_helpers import tiny_llava_dir  # noqa: E402

from lmforge.infer.engine import Engine  # noqa: E402

page = test_web_chat.page  # the browser page fixture, on this module's `live` server

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = Engine.from_pretrained(tiny_llava_dir(tmp_path_factory.mktemp("web_vlm")), max_batch_size=2)
    engine.start()
    server = LiveServer.start(engine)  # data URLs only: all the page sends
    yield server
    server.close()
    engine.stop()


def replies_done(page, count: int) -> None:
    wait_until(page, f"document.querySelectorAll('.message.assistant:not(.streaming)').length === {count}")


def test_image_upload_is_sent_and_shown(live, page, tmp_path):
    bodies = []
    page.on("request", lambda request: request.method == "POST" and bodies.append(json.loads(request.post_data)))
    picture = tmp_path / "red.png"
    Image.new("RGB", (20, 12), (220, 20, 20)).save(picture)
    open_chat(page, live)

    # 1. Attached: a thumbnail before sending; the turn goes out as an image part, then the text.
    page.set_input_files("#image-file", str(picture))
    page.wait_for_selector("#attachments img")
    page.fill("#max-tokens", "5")
    page.fill("#prompt", "What colour?")
    page.press("#prompt", "Enter")
    replies_done(page, 1)
    assert page.locator(".message.assistant.error").count() == 0, page.text_content(".message.assistant")
    (image_part, text_part), = [m["content"] for m in bodies[-1]["messages"]]
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and text_part == {"type": "text", "text": "What colour?"}
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",")[1]) == picture.read_bytes()
    # shown in the conversation, and no longer attached
    assert page.get_attribute(".message.user img", "src") == url
    assert page.text_content(".message.user") == "What colour?"
    assert page.locator("#attachments img").count() == 0

    # 2. The next turn sends the image again with the history; an image alone (no text) can be sent too.
    page.set_input_files("#image-file", str(picture))
    page.wait_for_selector("#attachments img")
    page.click("#send")
    replies_done(page, 2)
    messages = bodies[-1]["messages"]
    assert messages[0]["content"][0]["image_url"]["url"] == url
    assert messages[2] == {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    assert page.locator(".message.user img").count() == 2
    page.screenshot(path=str(tmp_path / "web_chat_images.png"))

    # 3. A file the page cannot decode is refused there; an attached image can be taken off again.
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    page.set_input_files("#image-file", str(junk))
    page.wait_for_selector("#attach-error")
    assert "junk.png: not an image" in page.text_content("#attach-error")
    assert page.locator("#attachments img").count() == 0
    page.set_input_files("#image-file", str(picture))
    page.wait_for_selector("#attachments img")
    page.click("#attachments button")
    assert page.locator("#attachments img").count() == 0

    # 4. A large photo is redrawn at most 1024 pixels a side, as a JPEG, so the body stays under the server's cap.
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1600, 3), dtype=np.uint8)
    large = tmp_path / "large.png"
    Image.fromarray(noise).save(large)
    assert large.stat().st_size > 2 * 2**20
    page.click("#new-chat")
    page.set_input_files("#image-file", str(large))
    page.wait_for_selector("#attachments img")
    page.fill("#prompt", "And this?")
    page.press("#prompt", "Enter")
    replies_done(page, 1)
    assert page.locator(".message.assistant.error").count() == 0, page.text_content(".message.assistant")
    sent = bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
    assert sent.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(sent.split(",")[1]))).size == (1024, 896)
    assert live.wait_idle() == 0
