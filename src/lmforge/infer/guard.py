"""What every request to `lmforge serve` passes before routing: `Guard`, a pure ASGI middleware that reads
only the headers (so the events of a stream pass through untouched), and the Host-name rules it applies.

Each check answers in OpenAI's error schema (openai_api.APIError); see Guard for the order, and serve.py's
docstring for what the server refuses after routing.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass

from starlette.requests import ClientDisconnect

from lmforge.infer.openai_api import APIError, excerpt

# The server's log: a client that hangs up is an event of the server, wherever it is caught.
log = logging.getLogger("lmforge.infer.server")


def host_name(host: str) -> str:
    """The name in a Host header, without its port, brackets or final dot, lowercased ("[::1]:8000" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, _ = host[1:].partition("]")
        name = name if bracket else host
    else:
        name, colon, port = host.rpartition(":")
        name = name if colon and port.isdigit() else host
    return name.rstrip(".")


def is_loopback(name: str) -> bool:
    """Whether a host name or address means this machine's loopback interface (localhost, 127.0.0.0/8, ::1)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_host_names(bind_host: str, allowed_hosts: list[str]) -> frozenset[str] | None:
    """The Host names answered besides loopback ones; None when any is. A server bound to a loopback address
    answers only loopback names, unless told more (`*`: any); one bound to the network checks only if told."""
    if "*" in allowed_hosts or not (allowed_hosts or is_loopback(bind_host.strip("[]").lower())):
        return None
    return frozenset(host_name(h) for h in allowed_hosts)


@dataclass
class Guard:
    """ASGI middleware: the checks every request passes before routing, read from its headers alone (so the
    events of a stream pass through untouched):
    1. its Host, where `allowed_hosts` is not None: a loopback name or one of them (else 403), so a web page
       on another name cannot reach a local server through DNS rebinding (Jupyter and Ollama check it too);
    2. with an API key, its Authorization on every /v1 path (else 401, before 404 or 405, as vLLM answers:
       a client without the key learns nothing of the routes);
    3. its body's size: a declared Content-Length over `max_body_bytes` is refused at once, and the body is
       counted as it arrives (a chunked upload declares none), refused (413) as soon as it passes the cap, so
       no more than the cap is ever buffered.
    A client that goes away before its request is answered is one line in the log, not a traceback."""

    app: object
    api_key: str | None
    allowed_hosts: frozenset[str] | None
    max_body_bytes: int

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope["path"], dict(scope["headers"]))
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        received = 0

        async def receive_within_cap():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise self.too_large()  # answered by the app's APIError handler: nothing was sent yet
            return message

        try:
            await self.app(scope, receive_within_cap, send)
        except ClientDisconnect:
            host, port = scope.get("client") or ("?", "?")
            log.warning("%s %s: the client %s:%s closed the connection before the answer", scope["method"],
                        scope["path"], host, port)

    def refusal(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        host = headers.get(b"host")
        if self.allowed_hosts is not None and host is not None:  # HTTP/1.0 may omit it; browsers never do
            name = host_name(host.decode("latin-1"))
            if not (is_loopback(name) or name in self.allowed_hosts):
                return APIError(403, f"This server does not answer requests for the host '{excerpt(name)}' (its Host "
                                "header): only loopback names (localhost, 127.0.0.1, [::1]) and those given to "
                                "--allowed-hosts, so that a web page on another name cannot reach it by DNS "
                                f"rebinding. To accept this name, start it with --allowed-hosts {excerpt(name)}",
                                code="host_not_allowed")
        if self.api_key is not None and path.startswith("/v1"):
            scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                return APIError(401, "Incorrect API key provided." if key else "Missing API key: send "
                                "'Authorization: Bearer KEY'.", code="invalid_api_key")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self.too_large()
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server takes: {self.max_body_bytes} bytes "
                        "(its --max-body-bytes).", code="request_too_large")
