"""vision/fetch.py: what a served request's image URLs may read, attacked. Data URLs (huge, not base64, not an
image, a bomb), local files (outside the directory, `..`, a link out of it, file:///etc/passwd, a FIFO), web URLs
(off by default, private hosts refused, and against a local HTTP server that streams forever, declares or sends
too many bytes, is slow, sends its headers slowly, redirects to a file: URL, answers 404 or non-image bytes).
Every refusal is an ImageError with one line naming the URL."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from lmforge.vision.fetch import ImagePolicy, fetch_image
from lmforge.vision.image import ImageError


def png_bytes(size=(12, 8), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 8000, height: int = 8000) -> bytes:
    """A PNG header declaring width x height pixels around almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def refused(url: str, policy: ImagePolicy, match: str) -> str:
    with pytest.raises(ImageError, match=match) as error:
        fetch_image(url, policy)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400
    return message


class Handler(BaseHTTPRequestHandler):
    """The attacks a web URL can make, one path each."""

    def log_message(self, *args):
        pass

    def send(self, body: bytes, status: int = 200, **headers):
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client hung up, as it should
            self.route()

    def route(self):
        if self.path == "/ok.png":
            self.send(png_bytes())
        elif self.path == "/bomb.png":
            self.send(bomb_png())
        elif self.path == "/text":
            self.send(b"<html>not an image</html>", **{"Content-Type": "image/png"})
        elif self.path == "/missing":
            self.send(b"no", status=404)
        elif self.path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(b"\0" * 1000)
        elif self.path == "/forever":  # no length, bytes until the client leaves
            self.send_response(200)
            self.end_headers()
            while True:
                self.wfile.write(b"\0" * 65536)
        elif self.path == "/slow":  # a byte at a time, each well inside a read timeout
            self.send_response(200)
            self.end_headers()
            while True:
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/slow-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            while True:
                self.wfile.write(b"X-A: b\r\n")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/to-file":
            self.send(b"", status=302, Location="file:///etc/passwd")
        elif self.path == "/to-ok":
            self.send(b"", status=301, Location="/ok.png")
        elif self.path == "/loop":
            self.send(b"", status=302, Location="/loop")


@pytest.fixture(scope="module")
def web():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


WEB = ImagePolicy(web=True, private_hosts=True, max_bytes=100_000, timeout=1.0)


def test_data_urls(tmp_path):
    policy = ImagePolicy(max_bytes=10_000)
    assert fetch_image(data_url(png_bytes()), policy).size == (12, 8)
    huge = data_url(b"\0" * 20_000)
    message = refused(huge, policy, "more than 10000 bytes")
    assert huge[:200] not in message  # the data is never echoed back
    refused("data:image/png;base64,@@@@", policy, "not valid base64")
    refused(data_url(b"GIF89a but not really"), policy, "not a readable image")
    refused(data_url(bomb_png()), ImagePolicy(), "8000x8000 pixels is over the limit")
    refused(data_url(png_bytes(), mime="text/html"), policy, "not a data:image")
    refused("data:image/png,rawbytes", policy, "not a data:image")


def test_local_files_only_under_the_directory(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "cat.png").write_bytes(png_bytes((5, 6)))
    (outside / "secret.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "junk.png").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    os.mkfifo(root / "fifo.png")
    policy = ImagePolicy(files=root, max_bytes=10_000)
    assert fetch_image("sub/cat.png", policy).size == (5, 6)
    assert fetch_image(str(root / "sub" / "cat.png"), policy).size == (5, 6)
    assert fetch_image((root / "sub" / "cat.png").as_uri(), policy).size == (5, 6)
    for url in ("file:///etc/passwd", "/etc/passwd", "../private/secret.png", "sub/../../private/secret.png",
                str(outside / "secret.png"), "link.png", (outside / "secret.png").as_uri()):
        message = refused(url, policy, "outside the directory this server reads images from")
        assert message.endswith("reads images from")  # not which directory that is
    refused("file://otherhost/etc/passwd", policy, "on another host")
    refused("fifo.png", policy, "no such file")  # not a regular file: never opened
    refused("nope.png", policy, "no such file")
    (root / "loop.png").symlink_to(root / "loop.png")
    for url in ("nul\0.png", "x" * 5000 + ".png", "loop.png"):  # whatever the OS says of them, one ImageError
        refused(url, policy, "")
    refused("junk.png", policy, "not a readable image")
    (root / "big.png").write_bytes(png_bytes() + b"\0" * 20_000)
    refused("big.png", policy, "larger than 10000 bytes")
    refused("sub/cat.png", ImagePolicy(), "reads no local files")
    refused("ftp://example.com/a.png", policy, "a ftp: URL")


def test_web_urls_off_by_default_and_private_hosts_refused(web):
    refused(f"{web}/ok.png", ImagePolicy(files=None), "does not fetch web URLs")
    refused(f"{web}/ok.png", ImagePolicy(web=True), "loopback, private or reserved address")
    refused("http://localhost:1/x.png", ImagePolicy(web=True), "loopback, private or reserved address")
    refused("http://[::1]:1/x.png", ImagePolicy(web=True), "loopback, private or reserved address")
    refused("http://169.254.169.254/latest/meta-data", ImagePolicy(web=True), "private or reserved")


def test_web_fetch_and_its_limits(web):
    assert fetch_image(f"{web}/ok.png", WEB).size == (12, 8)
    assert fetch_image(f"{web}/to-ok", WEB).size == (12, 8)  # an http redirect is followed
    refused(f"{web}/to-file", WEB, "redirected to file:///etc/passwd; only http")
    refused(f"{web}/loop", WEB, "more than 5 redirects")
    refused(f"{web}/missing", WEB, "HTTP 404")
    refused(f"{web}/text", WEB, "not a readable image")
    refused(f"{web}/bomb.png", WEB, "over the limit")
    refused(f"{web}/declared-big", WEB, "1000000000 bytes, more than the 100000")
    refused(f"{web}/forever", WEB, "more than the 100000 bytes")
    for path in ("/slow", "/slow-headers"):
        started = time.monotonic()
        refused(f"{web}{path}", WEB, "not fetched within 1 s")
        assert time.monotonic() - started < 30  # cut off (a loose bound: only that it ends)
