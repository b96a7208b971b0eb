"""The images a served chat names, read under a policy: `fetch_image(url, policy)`.

A request to `lmforge serve` names each image by an OpenAI `image_url`, and the server reads it on the
client's behalf, so what it may read is the operator's choice (`ImagePolicy`, from serve's --image-* flags):
- a `data:image/...;base64,` URL: always (its bytes came with the request);
- a local file (`file:///abs/path`, or a plain path, relative to the directory): only under `files`, after
  resolving `..` and symbolic links, and only a regular file (a FIFO or a device would block or never end);
  `files` None: no local files at all;
- an http(s) URL: only with `web`. The host must resolve to a public address unless `private_hosts` (else a
  client could make the server read its loopback services, its intranet or a cloud metadata endpoint), and the
  connection goes to the address that was checked, so DNS cannot answer differently the second time.
  Redirects are followed (at most MAX_REDIRECTS) only to http(s) URLs that pass the same checks. The body is
  read in chunks and refused as soon as it passes `max_bytes`; the whole fetch (connect, headers, body) is
  cut off at `timeout` seconds: a watchdog shuts the socket down, so a server that sends a byte a second
  cannot stretch it.
Every image, however it came, is decoded by image.read_image, which refuses one whose header declares more
than `max_pixels` pixels before decoding it (a decompression bomb), and bytes that are no image.
Refusals are ImageErrors (ValueError) with a one-line message naming the URL; the server adds the field.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

from lmforge.vision.image import DATA_URL, MAX_PIXELS, ImageError, read_image

if TYPE_CHECKING:
    from PIL import Image

MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class ImagePolicy:
    """Where the images of a request may come from, and how much of them is read."""

    files: Path | None = None  # local files under this directory; None: none
    web: bool = False  # fetch http(s) URLs
    private_hosts: bool = False  # ... also from loopback, private and link-local addresses
    max_bytes: int = 20 * 2**20  # an image's encoded bytes, however it came
    timeout: float = 10.0  # seconds for one web fetch, from connecting to the last byte
    max_pixels: int = MAX_PIXELS


def short(url: str, limit: int = 80) -> str:
    """A URL as error messages quote it: a data URL's megabytes are never echoed back."""
    return url if len(url) <= limit else url[:limit] + "..."


def fetch_image(url: str, policy: ImagePolicy) -> Image.Image:
    """The image `url` names, read under `policy` (see the module's docstring)."""
    if url.startswith("data:"):
        return _data_url(url, policy)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("http", "https"):
        if not policy.web:
            raise ImageError(f"{short(url)}: this server does not fetch web URLs (`lmforge serve --image-urls true` "
                             "turns that on); send the image as a data URL")
        return read_image(_download(url, policy), policy.max_pixels, name=short(url))
    if scheme not in ("", "file"):
        raise ImageError(f"{short(url)}: a {scheme}: URL; images are data URLs, local files or http(s) URLs")
    return read_image(_local_file(url, policy), policy.max_pixels)


def _data_url(url: str, policy: ImagePolicy) -> Image.Image:
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise ImageError(f"{short(url, 40)}: not a data:image/...;base64, URL")
    if len(match.group(1)) * 3 // 4 > policy.max_bytes:  # before decoding it
        raise ImageError(f"{short(url, 40)}: the data URL holds more than {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        raise ImageError(f"{short(url, 40)}: not valid base64") from None
    return read_image(data, policy.max_pixels, name=f"{short(url, 30)} (a data URL)")


def _local_file(url: str, policy: ImagePolicy) -> Path:
    """The file a path or file: URL names, if the policy lets it be read."""
    if policy.files is None:
        raise ImageError(f"{short(url)}: this server reads no local files (`lmforge serve --image-dir DIR` allows "
                         "those under DIR); send the image as a data URL")
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"{short(url)}: a file: URL on another host")
        url = unquote(parts.path)
    root = policy.files.resolve()
    try:
        path = (root / url).resolve()  # an absolute path replaces the root; `..` and links are resolved
        inside = path.is_relative_to(root)
        regular = inside and path.is_file()  # never stat a file outside
        size = path.stat().st_size if regular else 0
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, too long a name, a loop of links
        raise ImageError(f"{short(url)}: not a file this server can read ({type(e).__name__})") from None
    if not inside:
        raise ImageError(f"{short(url)}: outside the directory this server reads images from")
    if not regular:
        raise ImageError(f"{short(url)}: no such file in the directory this server reads images from")
    if size > policy.max_bytes:
        raise ImageError(f"{short(url)}: larger than {policy.max_bytes} bytes")
    return path


def _download(url: str, policy: ImagePolicy) -> bytes:
    """The body of a 200 answer to GET `url`, following http(s) redirects, within the size and time limits."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(MAX_REDIRECTS + 1):
        connection = _connect(url, policy, deadline)
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0), _cut, [connection])
        watchdog.start()
        try:
            location, body = _get(connection, url, policy, deadline)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise ImageError(f"{short(url)}: not fetched within {policy.timeout:g} s") from None
            raise ImageError(f"{short(url)}: {type(e).__name__}: {e}") from None
        finally:
            watchdog.cancel()
            connection.close()
        if location is None:
            return body
        target = urljoin(url, location)
        if urlsplit(target).scheme.lower() not in ("http", "https"):
            raise ImageError(f"{short(url)}: redirected to {short(target)}; only http(s) redirects are followed")
        url = target
    raise ImageError(f"{short(url)}: more than {MAX_REDIRECTS} redirects")


def _get(connection: http.client.HTTPConnection, url: str, policy: ImagePolicy,
         deadline: float) -> tuple[str | None, bytes]:
    """(a redirect's Location, None) or (None, the body of a 200 answer)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection.request("GET", target, headers={"Accept": "image/*", "Accept-Encoding": "identity",
                                               "User-Agent": "lmforge"})
    response = connection.getresponse()
    if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
        return response.getheader("Location"), b""
    if response.status != 200:
        raise ImageError(f"{short(url)}: HTTP {response.status} {response.reason}")
    declared = response.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise ImageError(f"{short(url)}: {declared} bytes, more than the {policy.max_bytes} this server reads")
    body = bytearray()
    while chunk := response.read1(CHUNK_BYTES):
        body += chunk
        if len(body) > policy.max_bytes:
            raise ImageError(f"{short(url)}: more than the {policy.max_bytes} bytes this server reads")
        if time.monotonic() >= deadline:
            raise ImageError(f"{short(url)}: not fetched within {policy.timeout:g} s")
    if time.monotonic() >= deadline:  # the watchdog's shutdown reads as the end of the body
        raise ImageError(f"{short(url)}: not fetched within {policy.timeout:g} s")
    return None, bytes(body)


class PinnedConnection(http.client.HTTPConnection):
    """HTTP, or HTTPS with `tls`, to `host` (its Host header and certificate name) at the checked `address`."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext | None):
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = address, tls

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock


def _connect(url: str, policy: ImagePolicy, deadline: float) -> PinnedConnection:
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        raise ImageError(f"{short(url)}: not a valid port") from None
    if not parts.hostname:
        raise ImageError(f"{short(url)}: no host")
    address = _checked_address(url, parts.hostname, port, policy)
    connection = PinnedConnection(parts.hostname, port, address, max(deadline - time.monotonic(), 0.001),
                                  ssl.create_default_context() if https else None)
    try:
        connection.connect()
    except OSError as e:
        raise ImageError(f"{short(url)}: cannot connect: {e}") from None
    return connection


def _checked_address(url: str, host: str, port: int, policy: ImagePolicy) -> str:
    """The address to connect to: the host's first, if every address it has is allowed (a public one, or any
    with `private_hosts`)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ImageError(f"{short(url)}: cannot resolve {host}: {e}") from None
    addresses = [info[4][0] for info in infos]
    if not policy.private_hosts:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip
            if not ip.is_global:
                raise ImageError(f"{short(url)}: {host} is a loopback, private or reserved address ({address}); "
                                 "this server fetches from public hosts only (--image-url-private true allows "
                                 "those)")
    return addresses[0]


def _cut(connection: http.client.HTTPConnection) -> None:
    """The watchdog: end a fetch that is past its time, waking a read that blocks on the socket."""
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)
