"""The web face under attack from a stranger on the LAN (no token, no secret): connection slots, slow requests and
odd headers, over real sockets and real TLS. Another source address is 127.0.0.2 (all of 127.0.0.0/8 is loopback)."""
from __future__ import annotations

import http.client
import socket
import ssl
import time

import pytest
from conftest import SHORT_TIMEOUT, make_file
from webfixtures import face_factory, fetch  # noqa: F401 - fixtures used by name

from minitorrent.web.face import WebFace
from minitorrent.wire.tls import ServerTls, client_context

STRANGER = "127.0.0.2"  # the attacker's address; the legitimate client comes from 127.0.0.1


def tls_to(address: tuple[str, int], source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A finished TLS connection to ``address`` from ``source`` (any certificate)."""
    raw = socket.create_connection(address, timeout=SHORT_TIMEOUT, source_address=(source, 0))
    return client_context().wrap_socket(raw)


def status_while_held(face: WebFace, held: list[socket.socket]) -> int:
    """The HTTP status of ``/api/v1/status`` asked from 127.0.0.1 while the ``held`` connections stay open; they close after."""
    try:
        return fetch(face.address, "/api/v1/status", secure=True).status
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def quick_face(server_factory):
    """A main server's HTTPS face with a 1 s I/O timeout and 8 connection slots; stopped after the test."""
    engine = server_factory()
    face = WebFace(engine, "127.0.0.1", 0, io_timeout_s=1.0, tls=ServerTls(engine.identity), max_connections=8)
    face.start()
    yield face
    face.stop()


class TestConnectionFairShare:
    def test_a_strangers_silent_connections_do_not_lock_out_another_machine(self, https_face_8):
        """Every slot held by silent connections from one address: a client from another address is still served."""
        face = https_face_8
        silent = [socket.create_connection(face.address, timeout=SHORT_TIMEOUT, source_address=(STRANGER, 0))
                  for _ in range(8)]
        assert 200 == status_while_held(face, silent)

    def test_a_strangers_open_tls_connections_do_not_lock_out_another_machine(self, https_face_8):
        """Every slot held by finished TLS handshakes that send no request: another address is still served."""
        face = https_face_8
        assert 200 == status_while_held(face, [tls_to(face.address, STRANGER) for _ in range(8)])


@pytest.fixture
def https_face_8(server_factory, face_factory):
    """An open main server's HTTPS face with 8 connection slots (the usual I/O timeout)."""
    engine = server_factory()
    return face_factory(engine, tls=ServerTls(engine.identity), max_connections=8)


class TestRequestDeadline:
    def test_a_trickled_request_head_is_cut_at_the_io_timeout(self, quick_face):
        """A request head trickled a byte every 0.3 s (each under the 1 s timeout) is closed within about 1 s."""
        with tls_to(quick_face.address) as sock:
            sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            closed = False
            while not closed and time.monotonic() - started < 5.0:
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.3)
                try:
                    closed = sock.recv(1) == b""
                except (TimeoutError, socket.timeout):
                    pass
                except (ConnectionError, ssl.SSLError):
                    closed = True
            took = time.monotonic() - started
        assert (True, True) == (closed, took < 3.0)

    def test_a_kept_alive_connection_is_closed_after_the_io_timeout(self, quick_face):
        """After an answer, a connection that sends nothing more is closed by the server within about 1 s."""
        with tls_to(quick_face.address) as sock:
            sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(SHORT_TIMEOUT)
            head = sock.recv(12)
            started = time.monotonic()
            while sock.recv(65536):  # the rest of the answer, then the server's close
                pass
            took = time.monotonic() - started
        assert (b"HTTP/1.1 200", True) == (head, took < 3.0)


class TestHugeRange:
    def test_a_range_with_thousands_of_digits_is_ignored(self, server_factory, face_factory, tmp_path):
        """Range: bytes=<5000 digits>- gets the whole file (200), not a 500 with a traceback in the log."""
        engine = server_factory()
        record = engine.add_file(make_file(tmp_path / "in" / "r.bin", 1000, seed=3)).record
        face = face_factory(engine)
        answer = fetch(face.address, f"/files/{record.sha256}/r.bin", {"Range": "bytes=" + "9" * 5000 + "-"})
        assert (200, 1000) == (answer.status, len(answer.body))


class TestHugeQueryNumbers:
    def test_an_offset_past_sqlites_integers_is_a_400(self, server_factory, face_factory):
        """/api/v1/files?offset=<30 digits> is 400 BAD_REQUEST, not a 500 with a traceback in the log."""
        face = face_factory(server_factory())
        answer = fetch(face.address, "/api/v1/files?offset=" + "9" * 30)
        assert (400, "BAD_REQUEST") == (answer.status, answer.json()["error"]["code"])


class TestRequestHeadSize:
    def test_a_request_head_of_400_kib_is_refused_with_431(self, server_factory, face_factory):
        """50 headers of 8 KiB each (each line within http.server's own limits) get 431, not an answer."""
        face = face_factory(server_factory())
        headers = {f"X-Pad-{i}": "p" * 8192 for i in range(50)}
        assert 431 == fetch(face.address, "/api/v1/status", headers).status

    def test_a_normal_request_still_passes_after_a_big_one_on_the_same_connection(self, server_factory, face_factory):
        """The budget is per request: two requests of 40 KiB of headers each on one connection are both answered."""
        face = face_factory(server_factory())
        connection = http.client.HTTPConnection(*face.address, timeout=SHORT_TIMEOUT)
        statuses = []
        try:
            for _ in range(2):
                connection.request("GET", "/api/v1/status", headers={f"X-Pad-{i}": "p" * 4096 for i in range(10)})
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            connection.close()
        assert [200, 200] == statuses
