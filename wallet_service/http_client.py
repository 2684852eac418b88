"""A kept-alive HTTP/1.1 client for the hot requests between the parties: the worker's and
the phones' SMS centre requests (every top-up crosses the SMS centre some fourteen times),
the bank's signed callbacks, a bench phone's payments.

The request is written here — a request line and a few headers (RFC 9112 §3, §6.2) — and
the answer is parsed by httptools (llhttp, Node.js's HTTP parser, in C). Against the SMS
centre, one inbox request costs the client about a fifth of the CPU of urllib3's
PoolManager, which parses URLs, headers and pool keys in Python on every request
(``bench.http_client``).

Connections are kept alive in a small pool shared by the client's threads. A kept-alive
connection that the server closed as it was reused (the request went unanswered, not one
byte came back) is tried once more on a new connection: the server never read it, or read
it and answered nothing. Either way the callers here treat a duplicate as they must anyway
(an SMS may come twice; a webhook is deduplicated by its id; the bank pays an order once).
Any other failure — a refused connection, a timeout, a connection closed mid-answer — is an
``HttpClientError``, an ``OSError``: callers treat it as the network failing.
"""

from __future__ import annotations

import json as json_module
import re
import socket
import ssl
import threading
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

idle_connections_max = 16  # kept per origin: a worker's two loops, a bench's phones
answer_bytes_max = 16 * 1024 * 1024  # an answer larger than this is refused, unread
_RECEIVE_CHUNK_BYTES = 65_536
# What a request target or header may not hold (RFC 9112 §3.2, RFC 9110 §5.5): controls,
# spaces in a target, CR/LF anywhere (they would end the line and start another header).
_TARGET_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_FIELD_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpClientError(OSError):
    """The server could not be reached, timed out, or broke off its answer."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        """The body as JSON (ValueError when it is not)."""
        return json_module.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def check_target(target: str) -> None:
    """ValueError unless ``target`` is a request target this client sends as it is: a path
    (and query) in ASCII, with no space or control character (RFC 9112 §3.2)."""
    if not target.startswith("/") or not target.isascii() or _TARGET_FORBIDDEN.search(target):
        raise ValueError(f"not a request target (a path in ASCII, no spaces): {target!r}")


def _host_field(hostname: str, port: int | None) -> str:
    """The Host header (RFC 9110 §7.2): an IPv6 literal in brackets, a name in IDNA."""
    host = f"[{hostname}]" if ":" in hostname else hostname.encode("idna").decode("ascii")
    return host if port is None else f"{host}:{port}"


def origin_and_target(url: str) -> tuple[str, str]:
    """``http://host:port/path?query`` → (``http://host:port``, ``/path?query``)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme}://{parts.netloc}", target


class KeepAliveClient:
    """Requests to one origin (``http://host:port`` or ``https://…``), each on a pooled
    connection. Thread-safe: a thread takes a connection from the pool for its request and
    gives it back once the answer is read in full."""

    def __init__(self, origin: str, ssl_context: ssl.SSLContext | None = None) -> None:
        """ValueError: not an http(s) origin (a URL's scheme, host and port only)."""
        parts = urlsplit(origin)  # (ValueError itself for a broken IPv6 literal)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        if parts.path.strip("/") or parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"an origin has no path, query or user: {origin!r}")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)  # (ValueError)
        self._host_header = _host_field(parts.hostname, parts.port)
        self._closed = False
        self._tls = None
        if parts.scheme == "https":
            self._tls = ssl_context or ssl.create_default_context()
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._idle)  # a client dropped closes its sockets

    def request(
        self,
        method: str,
        target: str,
        *,
        timeout_s: float,
        json: Any = None,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """``target`` is the path and query (``/inbox/123/next``). ``json`` (when given)
        is sent as the body, as application/json."""
        fields = dict(headers or {})
        if json is not None:
            body = json_module.dumps(json).encode()
            fields.setdefault("Content-Type", "application/json")
        message = self._head(method, target, fields, len(body)) + body
        connection, reused = self._take(timeout_s)
        while True:
            try:
                answer, keep = _exchange(connection, message, timeout_s)
                break
            except _Unanswered as unanswered:
                connection.close()
                if not reused:
                    raise HttpClientError(f"{self.origin}: {unanswered}") from None
                connection, reused = self._connect(timeout_s), False  # once more, on a new one
            except BaseException:
                connection.close()
                raise
        if keep:
            self._give_back(connection)
        else:
            connection.close()
        return answer

    def close(self) -> None:
        """Close the idle connections; one in use closes as its request ends. (The client
        still works: a later request opens a connection, and closes it after.)"""
        with self._lock:
            self._closed = True
            _close_all(self._idle)

    def _head(self, method: str, target: str, fields: dict[str, str], length: int) -> bytes:
        # (HEAD is not asked: its answer's length describes a body that never comes)
        if not method.isalpha() or not method.isascii() or method == "HEAD":
            raise ValueError(f"not a request method this client sends: {method!r}")
        check_target(target)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        if length or method not in ("GET", "DELETE"):
            lines.append(f"Content-Length: {length}")
        for name, value in fields.items():
            if not name.isascii() or _FIELD_FORBIDDEN.search(name + value) or ":" in name:
                raise ValueError(f"not a header field: {name!r}")
            if not value.isascii():  # (RFC 9110 §5.5: obsolete; servers read it apart)
                raise ValueError(f"not a header field value in ASCII: {name!r}")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _take(self, timeout_s: float) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(timeout_s), False

    def _give_back(self, connection: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < idle_connections_max:
                self._idle.append(connection)
                return
        connection.close()

    def _connect(self, timeout_s: float) -> socket.socket:
        try:
            connection = socket.create_connection((self.host, self.port), timeout=timeout_s)
        except OSError as error:
            raise HttpClientError(f"{self.origin}: cannot connect: {error}") from None
        try:  # (a request goes out in one send: nothing for Nagle's algorithm to hold back)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as error:
            connection.close()
            raise HttpClientError(f"{self.origin}: {error}") from None
        if self._tls is None:
            return connection
        try:
            return self._tls.wrap_socket(connection, server_hostname=self.host)
        except (OSError, ssl.SSLError) as error:
            connection.close()
            raise HttpClientError(f"{self.origin}: TLS: {error}") from None


class _Unanswered(Exception):
    """The connection failed before a byte of the answer came."""


class _Parsed:
    """httptools' callbacks: what came of the answer so far."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.keep_alive = False  # (read as the headers end: llhttp forgets it by the end)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.headers_done = self.interim = self.complete = self.too_large = False
        self.more_after_it = False  # bytes after the answer: the connection is not kept

    def on_message_begin(self) -> None:
        if self.complete:  # a second message where none was asked for
            self.more_after_it = True
            raise ValueError("bytes after the answer")  # (httptools stops there)
        self.headers, self.headers_done = {}, False  # (after an interim answer)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()
        # 1xx but 101 (RFC 9110 §15.2): interim — 100 Continue, 103 Early Hints — the
        # answer follows it
        self.interim = 100 <= self.status < 200 and self.status != 101
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.too_large = self.size > answer_bytes_max
        if self.too_large:
            raise ValueError("too large")  # (httptools stops and raises its own error)
        self.chunks.append(chunk)

    def on_message_complete(self) -> None:
        self.complete = not self.interim

    def ends_at_close(self) -> bool:
        """An answer with neither length nor chunks runs to the connection's close
        (RFC 9112 §6.3, rules 7 and 8)."""
        return (
            self.headers_done
            and "content-length" not in self.headers
            and not self.headers.get("transfer-encoding", "").lower().endswith("chunked")
        )


def _exchange(connection: socket.socket, message: bytes, timeout_s: float) -> tuple[Answer, bool]:
    """Send ``message``, read its answer: (the answer, whether the connection may be kept)."""
    parsed = _Parsed()
    received = False
    try:
        connection.settimeout(timeout_s)
        connection.sendall(message)
        while not parsed.complete:
            data = connection.recv(_RECEIVE_CHUNK_BYTES)
            if not data:
                if not received:
                    raise _Unanswered("the connection closed unanswered")
                if parsed.ends_at_close():
                    break
                raise HttpClientError("the connection closed mid-answer")
            received = True
            parsed.parser.feed_data(data)
    except (BrokenPipeError, ConnectionResetError) as error:
        if not received:
            raise _Unanswered(f"the connection closed unanswered ({error})") from None
        raise HttpClientError(f"the connection broke mid-answer: {error}") from None
    except TimeoutError:
        raise HttpClientError(f"no answer within {timeout_s:g} s") from None
    except httptools.HttpParserUpgrade:  # (101 Switching Protocols: not to these requests)
        raise HttpClientError("the server switched protocols") from None
    except httptools.HttpParserError as error:
        if parsed.too_large:
            raise HttpClientError(f"an answer larger than {answer_bytes_max} bytes") from None
        if not parsed.more_after_it:
            raise HttpClientError(f"not an HTTP answer: {error}") from None
    except HttpClientError:
        raise
    except OSError as error:
        raise HttpClientError(f"the connection failed: {error}") from None
    answer = Answer(parsed.status, parsed.headers, b"".join(parsed.chunks))
    return answer, parsed.complete and parsed.keep_alive and not parsed.more_after_it


def _close_all(connections: list[socket.socket]) -> None:
    while connections:
        connections.pop().close()
