"""TLS 1.3 with pinned identities, over real sockets on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import ssl
import threading

import pytest
from conftest import SHORT_TIMEOUT, TlsServer

from error_handler import ConnectionFailed
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.tls import ClientTls, IdentityRefused, PinStore, ServerTls


@pytest.fixture
def server_tls(tmp_path) -> ServerTls:
    return ServerTls(load_or_create(tmp_path / "server"))


def dial(client: ClientTls, address: tuple[str, int], expected: str = ""):
    return client.handshake(socket.create_connection(address, timeout=SHORT_TIMEOUT), *address, expected)


class TestHandshake:
    def test_tls_13_and_the_servers_identity(self, server_tls):
        """A client gets TLS 1.3 and learns the identity the server's certificate hashes to."""
        server = TlsServer(server_tls)
        try:
            sock = dial(ClientTls(), server.address)
            assert ("TLSv1.3", server_tls.id) == (sock.version(), sock.server_identity)
            sock.close()
        finally:
            server.close()

    def test_a_plain_tcp_server_is_a_connection_failure(self):
        """A server that does not speak TLS fails the handshake (ConnectionFailed, retried elsewhere)."""
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=lambda: listener.accept()[0].sendall(b"MT not tls" * 10), daemon=True).start()
        try:
            with pytest.raises(ConnectionFailed, match="TLS handshake"):
                dial(ClientTls(), listener.getsockname()[:2])
        finally:
            listener.close()

    def test_a_socket_shut_down_before_its_handshake_is_a_connection_failure(self, server_tls):
        """A stopping server shuts a connection down before its handshake: ConnectionFailed, not a crash."""
        ours, theirs = socket.socketpair()
        sock = server_tls.wrap(ours)
        sock.shutdown(socket.SHUT_RDWR)  # what RequestServer.stop does to every open connection
        try:
            with pytest.raises(ConnectionFailed, match="TLS handshake failed"):
                server_tls.handshake(sock, SHORT_TIMEOUT)
        finally:
            sock.close()
            theirs.close()

    def test_tls_12_is_refused(self, server_tls):
        """A client offering at most TLS 1.2 cannot connect."""
        server = TlsServer(server_tls)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            with pytest.raises(ssl.SSLError):
                old.wrap_socket(socket.create_connection(server.address, timeout=SHORT_TIMEOUT))
        finally:
            server.close()


class TestFileRanges:
    def test_a_file_range_arrives_exact_with_its_head_first(self, server_tls, tmp_path):
        """``sendfile`` on a TLS socket sends head + the exact range, larger than its buffer."""
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(3 * 1024 * 1024 + 11))
        offset, count = 11, 3 * 1024 * 1024

        def serve(sock) -> None:
            with open(blob, "rb") as file:
                sock.sendall(b"HEAD", socket.MSG_MORE)
                sock.sendfile(file, offset, count)

        server = TlsServer(server_tls, serve)
        try:
            sock = dial(ClientTls(), server.address)
            received = bytearray()
            while data := sock.recv(1 << 20):
                received += data
            sock.close()
        finally:
            server.close()
        assert b"HEAD" + blob.read_bytes()[offset:offset + count] == bytes(received)


class TestPinning:
    def test_first_use_pins_and_the_same_identity_passes_again(self, server_tls, tmp_path):
        """The first contact records the identity; the next contact with it is accepted."""
        pins = PinStore(tmp_path / "client" / "known_servers.json")
        server = TlsServer(server_tls)
        try:
            dial(ClientTls(pins), server.address).close()
            dial(ClientTls(pins), server.address).close()
        finally:
            server.close()
        assert {"{}:{}".format(*server.address): server_tls.id} == pins.known()

    def test_a_changed_identity_is_refused_naming_both_and_the_way_to_accept(self, server_tls, tmp_path):
        """After pinning, another certificate at that address is refused: one line, both IDs, the file to edit."""
        pins = PinStore(tmp_path / "client" / "known_servers.json")
        server = TlsServer(server_tls)
        dial(ClientTls(pins), server.address).close()
        server.close()
        address = "{}:{}".format(*server.address)
        impostor = ServerTls(load_or_create(tmp_path / "impostor"))
        in_its_place = TlsServer(impostor, port=server.address[1])
        try:
            with pytest.raises(IdentityRefused) as refused:
                dial(ClientTls(pins), in_its_place.address)
        finally:
            in_its_place.close()
        text = str(refused.value)
        assert "\n" not in text
        assert [True, True, True] == [server_tls.id in text, impostor.id in text, str(pins.path) in text]
        assert {address: server_tls.id} == pins.known()  # never re-trusted silently

    def test_the_configured_identity_wins_over_first_use(self, server_tls, tmp_path):
        """With server.main.id set, a server presenting another identity is refused even on first contact."""
        server = TlsServer(server_tls)
        address = "{}:{}".format(*server.address)
        expected = load_or_create(tmp_path / "the real one").id
        pins = PinStore(tmp_path / "pins.json", {address: (expected, "server.main.id")})
        try:
            with pytest.raises(IdentityRefused, match=f"set server.main.id: {server_tls.id}"):
                dial(ClientTls(pins), server.address)
        finally:
            server.close()
        assert {} == pins.known()

    def test_a_peer_is_held_to_the_identity_the_tracker_gave(self, server_tls, tmp_path):
        """A seeder presenting another identity than the tracker's is refused; the right one passes."""
        server = TlsServer(server_tls)
        other = load_or_create(tmp_path / "other").id
        try:
            with pytest.raises(IdentityRefused, match="not the expected " + other):
                dial(ClientTls(), server.address, expected=other)
            dial(ClientTls(), server.address, expected=server_tls.id).close()
        finally:
            server.close()


class TestManInTheMiddle:
    def test_a_proxy_with_its_own_certificate_is_refused(self, server_tls, tmp_path):
        """A machine in the middle that terminates TLS with its own certificate is refused by a pinning client."""
        real = TlsServer(server_tls)
        mitm_tls = ServerTls(load_or_create(tmp_path / "mitm"))

        def relay(sock) -> None:
            upstream = dial(ClientTls(), real.address)  # it can reach the real server, but not be it
            upstream.sendall(sock.recv(100))

        mitm = TlsServer(mitm_tls, relay)
        address = "{}:{}".format(*mitm.address)
        pins = PinStore(tmp_path / "pins.json", {address: (server_tls.id, "server.main.id")})
        try:
            with pytest.raises(IdentityRefused, match=mitm_tls.id):
                dial(ClientTls(pins), mitm.address)
        finally:
            mitm.close()
            real.close()
