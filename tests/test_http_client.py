"""The keep-alive HTTP client: one connection carries request after request; a kept-alive
connection dropped unanswered is tried once more on a new one, nothing else is; whatever
breaks is an OSError; what it sends cannot be turned into another request."""

from __future__ import annotations

import datetime
import gc
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import serving
from wallet_service import http_client
from wallet_service.http_client import HttpClientError, KeepAliveClient, origin_and_target

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{"id":1}'


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers each POST with what it got (method, path, headers), kept alive."""

    protocol_version = "HTTP/1.1"
    connections: list[int]

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        seen = f"{self.command} {self.path} {self.headers['Content-Type']} ".encode() + body
        self.send_response(200)
        self.send_header("Content-Length", str(len(seen)))
        self.end_headers()
        self.wfile.write(seen)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[tuple[str, list[int]]]:
    connections: list[int] = []
    with serving(type("Echo", (_Echo,), {"connections": connections})) as origin:
        yield origin, connections


def test_one_kept_alive_connection_carries_every_request(echo) -> None:  # type: ignore[no-untyped-def]
    """(llhttp forgets whether a message keeps its connection by the message's end: read
    then, every request opened a connection of its own, and the benchmark fell by a
    third.)"""
    origin, connections = echo
    client = KeepAliveClient(origin)
    for n in range(50):
        answer = client.request("POST", f"/inbox/{n}", json={"n": n}, timeout_s=5)
        assert answer.status == 200
        assert answer.body == f'POST /inbox/{n} application/json {{"n": {n}}}'.encode()
    assert len(connections) == 1
    client.close()


def test_threads_share_the_pool_each_on_a_connection_of_its_own(echo) -> None:  # type: ignore[no-untyped-def]
    origin, connections = echo
    client = KeepAliveClient(origin)
    bodies: list[bytes] = []

    def ask() -> None:
        for n in range(20):
            bodies.append(client.request("POST", "/", body=b"%d" % n, timeout_s=5).body)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(bodies) == 80 and all(body.startswith(b"POST / None ") for body in bodies)
    assert 1 <= len(connections) <= 4
    client.close()


Script = Callable[[socket.socket], None] | bytes


class _Scripted:
    """A server that runs ``script`` on each connection it accepts, in order (bytes: read
    a request, send them)."""

    def __init__(self, *scripts: Script) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.origin = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, args=(scripts,), daemon=True)
        self.thread.start()

    def _serve(self, scripts: tuple[Script, ...]) -> None:
        for script in scripts:
            connection, _ = self.listener.accept()
            with connection:
                if isinstance(script, bytes):
                    self.read(connection)
                    connection.sendall(script)
                else:
                    script(connection)

    def read(self, connection: socket.socket) -> bytes:
        request = connection.recv(65536)
        self.requests.append(request)
        return request

    def close(self) -> None:
        self.thread.join(timeout=5)
        self.listener.close()

    def unserved_connections(self) -> int:
        """Connections made after the scripts ran out (waiting in the backlog, unread)."""
        self.listener.setblocking(False)
        waiting = 0
        while True:
            try:
                self.listener.accept()[0].close()
            except BlockingIOError:
                return waiting
            waiting += 1


def _reset(connection: socket.socket) -> None:
    """Close with an RST, as a server dropping a connection does."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_a_kept_alive_connection_dropped_unanswered_is_tried_once_more_on_a_new_one() -> None:
    def answer_then_drop(connection: socket.socket) -> None:
        server.read(connection)
        connection.sendall(OK)
        server.read(connection)
        _reset(connection)

    server = _Scripted(answer_then_drop, OK)
    client = KeepAliveClient(server.origin)
    assert client.request("POST", "/submit", body=b"1", timeout_s=5).json() == {"id": 1}
    assert client.request("POST", "/submit", body=b"2", timeout_s=5).json() == {"id": 1}
    server.close()
    assert [request.endswith(b"\r\n\r\n2") for request in server.requests] == [False, True, True]
    client.close()


def test_a_new_connection_dropped_unanswered_is_an_error_not_asked_again() -> None:
    def drop(connection: socket.socket) -> None:
        server.read(connection)
        _reset(connection)

    server = _Scripted(drop)
    client = KeepAliveClient(server.origin)
    with pytest.raises(HttpClientError, match="closed unanswered"):
        client.request("POST", "/submit", body=b"1", timeout_s=5)
    server.thread.join(timeout=5)
    assert server.unserved_connections() == 0  # (not asked again on another connection)
    server.close()
    assert len(server.requests) == 1


def _half_then_reset(connection: socket.socket) -> None:
    connection.recv(65536)
    connection.sendall(OK[:-3])
    _reset(connection)


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (OK[:-3], "closed mid-answer"),
        (_half_then_reset, "broke mid-answer"),
        (b"SMTP ready\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n01234567890", "larger than 10 bytes"),
    ],
)
def test_an_answer_broken_off_garbled_or_oversized_is_an_error_never_asked_again(
    monkeypatch: pytest.MonkeyPatch, script: Script, error: str
) -> None:
    monkeypatch.setattr(http_client, "answer_bytes_max", 10)
    server = _Scripted(script)  # (asked again, unanswered: "no answer within 5 s")
    with pytest.raises(HttpClientError, match=error):
        KeepAliveClient(server.origin).request("POST", "/", timeout_s=5)
    server.close()


def test_no_answer_in_time_is_an_os_error_and_the_connection_is_not_reused() -> None:
    def silent(connection: socket.socket) -> None:
        server.read(connection)
        time.sleep(1.0)

    server = _Scripted(silent, OK)
    client = KeepAliveClient(server.origin)
    started = time.monotonic()
    with pytest.raises(OSError, match=r"no answer within 0\.2 s"):
        client.request("POST", "/", timeout_s=0.2)
    assert time.monotonic() - started < 0.9
    assert client._idle == []  # closed, not pooled: its late answer would meet the next
    assert client.request("POST", "/", timeout_s=5).status == 200  # on a new connection
    server.close()
    client.close()


def test_answers_without_length_chunked_and_closing_are_read_whole() -> None:
    to_the_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    coded_to_the_close = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nas sent"

    def chunked(connection: socket.socket) -> None:
        server.read(connection)
        connection.sendall(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nRetry-After: 3\r\n\r\n"
            b"4\r\nfirs\r\n7\r\nt, then\r\n0\r\n\r\n"
        )
        server.read(connection)  # kept alive: the next request comes on it
        connection.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = _Scripted(to_the_close, coded_to_the_close, chunked)
    client = KeepAliveClient(server.origin)
    assert client.request("POST", "/", timeout_s=5).body == b"all of it"
    assert client.request("POST", "/", timeout_s=5).body == b"as sent"  # (not decoded)
    answer = client.request("POST", "/", timeout_s=5)
    assert (answer.status, answer.body, answer.headers["retry-after"]) == (201, b"first, then", "3")
    assert client.request("POST", "/", timeout_s=5).status == 204
    server.close()
    client.close()


def test_an_interim_answer_is_passed_over_for_the_answer_that_follows() -> None:
    """(Taken for the answer, 100 Continue or 103 Early Hints would leave the real answer
    on the connection, for the next request to read as its own.)"""

    def interim_then_answer(connection: socket.socket) -> None:
        server.read(connection)
        connection.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        time.sleep(0.1)  # (its own segment: the client has read it before the answer comes)
        connection.sendall(OK)
        server.read(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")

    server = _Scripted(interim_then_answer)
    client = KeepAliveClient(server.origin)
    answer = client.request("POST", "/", timeout_s=5)
    assert (answer.status, answer.body, "link" in answer.headers) == (200, b'{"id":1}', False)
    assert client.request("POST", "/", timeout_s=5).body == b"second"
    server.close()
    client.close()


def test_bytes_after_the_answer_leave_the_answer_whole_and_the_connection_unused() -> None:
    def answer_and_more(connection: socket.socket) -> None:
        server.read(connection)
        connection.sendall(OK + b"HTTP/1.1 500 Stray\r\nContent-Length: 2\r\n\r\nab")
        if server.read(connection):  # the connection used again: wrongly
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwrong")

    server = _Scripted(answer_and_more, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    client = KeepAliveClient(server.origin)
    first = client.request("POST", "/", timeout_s=5)
    assert (first.status, first.body) == (200, b'{"id":1}')
    assert client.request("POST", "/", timeout_s=5).body == b"second"  # on a new connection
    server.close()
    client.close()


def test_an_answer_switching_protocols_is_an_os_error() -> None:
    server = _Scripted(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    )
    with pytest.raises(HttpClientError, match="switched protocols"):
        KeepAliveClient(server.origin).request("POST", "/", timeout_s=5)
    server.close()


def test_a_refused_connection_is_an_os_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    with pytest.raises(OSError, match="cannot connect"):
        KeepAliveClient(f"http://127.0.0.1:{port}").request("POST", "/", timeout_s=5)


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("POST", "/a b", {}),
        ("POST", "/a\r\nX-Injected: 1", {}),
        ("POST", "no-slash", {}),
        ("GET /x HTTP/1.1\r\n", "/", {}),
        ("HEAD", "/", {}),
        ("POST", "/", {"X-Value": "1\r\nX-Injected: 1"}),
        ("POST", "/", {"X-Na:me": "1"}),
        ("POST", "/", {"X-Név": "1"}),
        ("POST", "/", {"X-Name": "név"}),
        ("POST", "/név", {}),
        ("PÖST", "/", {}),
    ],
)
def test_what_would_make_another_request_or_header_is_refused_unsent(
    method: str, target: str, headers: dict[str, str]
) -> None:
    client = KeepAliveClient("http://127.0.0.1:9")  # (never connected: refused before)
    with pytest.raises(ValueError, match="not a"):
        client.request(method, target, headers=headers, timeout_s=5)


@pytest.mark.parametrize(
    "origin",
    [
        "127.0.0.1:8070", "ftp://host", "http://", "http://h/x", "http://u:p@h", "http://:pw@h",
        "http://[::1", "http://h:port", "http://h:99999",
    ],
)  # fmt: skip
def test_an_origin_is_scheme_host_and_port_only(origin: str) -> None:
    with pytest.raises(ValueError):
        KeepAliveClient(origin)


def test_origin_and_target_split_a_url() -> None:
    assert origin_and_target("http://h:1/a/b?c=d") == ("http://h:1", "/a/b?c=d")
    assert origin_and_target("https://h") == ("https://h", "/")


def test_the_host_field_names_the_host_as_a_server_reads_it() -> None:
    assert KeepAliveClient("http://bücher.example:8080")._host_header == (
        "xn--bcher-kva.example:8080"
    )
    assert KeepAliveClient("http://[::1]:8080")._host_header == "[::1]:8080"
    assert KeepAliveClient("https://Example.com")._host_header == "example.com"


def test_a_client_dropped_closes_its_connections(echo) -> None:  # type: ignore[no-untyped-def]
    """(Unclosed, each would warn as it is collected; the suite turns warnings into
    errors.)"""
    origin, _ = echo
    client = KeepAliveClient(origin)
    client.request("POST", "/", timeout_s=5)
    (connection,) = client._idle
    del client
    gc.collect()
    assert connection.fileno() == -1


def test_https_with_the_servers_certificate_checked(tmp_path: Path) -> None:
    """TLS through the standard library's context: a certificate the context trusts is
    accepted, one it does not is an OSError."""
    certificate, key = _self_signed("127.0.0.1", tmp_path)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(certificate, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            try:
                with served.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(OK)
            except (ssl.SSLError, OSError):
                connection.close()  # the untrusting client hung up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    trusting = ssl.create_default_context(cafile=str(certificate))
    client = KeepAliveClient(f"https://127.0.0.1:{port}", ssl_context=trusting)
    assert client.request("POST", "/", timeout_s=5).json() == {"id": 1}
    client.close()
    with pytest.raises(HttpClientError, match="TLS"):
        KeepAliveClient(f"https://127.0.0.1:{port}").request("POST", "/", timeout_s=5)
    thread.join(timeout=5)
    listener.close()


def _self_signed(host: str, directory: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    address = x509.IPAddress(ipaddress.ip_address(host))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([address]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = directory / "cert.pem", directory / "key.pem"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_file, key_file
