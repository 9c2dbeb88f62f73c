"""TLS 1.3 on every connection, and how a program decides the other end is who it should be.

No certificate authority is involved: every program has a self-signed
certificate (``identity.py``), and a client checks the server's by its
identity (the SHA-256 of the certificate) right after the handshake:

* a seeding peer, against the identity the tracker handed out with its
  address (``ClientTls.expecting``);
* a server, against ``server.main.id`` / ``server.backup.id`` when the
  config sets them, otherwise against what this client saw the first time
  (``PinStore``, trust on first use). A different identity later is refused
  with one line naming both and how to accept the new one; never re-trusted
  silently.

The main and the backup also prove the cluster key to each other over the
TLS channel, each proof covering the server's identity as each side sees it
(``server_identity``), so a machine in the middle with its own certificate
cannot pass a proof on (see serving.py and remote.py).

Fast path: ``sendfile`` cannot hand file pages to a userspace TLS library,
so a TLS socket sends a file range by reading it into one reused buffer and
writing it in one call (OpenSSL cuts it into full 16 KiB records), with the
frame's head in the same write (``TlsSocket``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Callable

from config_loader import Config
from error_handler import AuthenticationFailed, ConfigError, ConnectionFailed
from minitorrent.wire.identity import Identity, id_of_certificate, parse_id

log = logging.getLogger(__name__)

# A default 1 MiB chunk with its frame's head in one write; a larger chunk goes in several.
SEND_BUFFER_BYTES = 1024 * 1024 + 64 * 1024
PIN_FILE = "known_servers.json"
_MSG_MORE = getattr(socket, "MSG_MORE", 0)

Secure = Callable[[socket.socket, str, int], socket.socket]  # what a dialer does to a fresh TCP socket


class IdentityRefused(AuthenticationFailed):
    """The other end's certificate is not the identity it must have (never retried)."""


class TlsSocket(ssl.SSLSocket):
    """An ``SSLSocket`` that sends file ranges in large writes and knows the server's identity.

    ``sendall(head, MSG_MORE)`` holds ``head`` back so that it leaves in the
    same write as the payload ``sendfile`` sends next (as MSG_MORE does on
    plain TCP); the payload is read into a buffer reused for the life of the
    socket, so memory per connection stays at ``SEND_BUFFER_BYTES``.
    """

    server_identity = ""  # set once the handshake is done (both sides)
    _held = b""
    _buffer: bytearray | None = None

    def sendall(self, data, flags: int = 0) -> None:
        if flags & _MSG_MORE:
            self._held += bytes(data)
            return
        held, self._held = self._held, b""
        super().sendall(held + bytes(data) if held else data)

    def shutdown(self, how: int) -> None:
        """Shut the TCP connection down but keep the TLS state (``SSLSocket.shutdown`` drops it).

        Another thread may still be reading or about to shake hands: without
        its TLS state it would fail oddly, or a later write would leave in clear.
        """
        socket.socket.shutdown(self, how)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        if self._buffer is None:
            self._buffer = bytearray(SEND_BUFFER_BYTES)
        head, self._held = self._held, b""
        remaining, sent = count or 0, 0
        view = memoryview(self._buffer)
        while remaining or head:
            room = min(remaining, len(view) - len(head))
            view[:len(head)] = head
            got = os.preadv(file.fileno(), [view[len(head):len(head) + room]], offset + sent) if room else 0
            super().sendall(view[:len(head) + got])
            head, sent, remaining = b"", sent + got, remaining - got
            if room and got == 0:
                break  # the file is shorter than promised: the caller sees sent < count
        return sent


def _context(side: int) -> ssl.SSLContext:
    context = ssl.SSLContext(side)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.sslsocket_class = TlsSocket
    return context


def server_context(identity: Identity) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting ``identity``'s certificate."""
    context = _context(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.path)
    return context


def client_context() -> ssl.SSLContext:
    """A TLS 1.3 client context that leaves the certificate check to us (by identity, after the handshake)."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # no CA vouches for a LAN program; its pinned identity does
    return context


def server_identity(sock: socket.socket) -> str:
    """The identity of the server end of ``sock`` ("" on a plain TCP socket): what peer proofs bind to."""
    return getattr(sock, "server_identity", "")


class ServerTls:
    """The server side: wrap accepted sockets, then shake hands in the connection's own thread."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.id = identity.id
        self.context = server_context(identity)

    def wrap(self, sock: socket.socket) -> TlsSocket:
        """``sock`` as a TLS socket whose handshake has not started (no I/O: the accept loop may call it)."""
        tls_sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls_sock.server_identity = self.id
        return tls_sock

    def handshake(self, sock: TlsSocket, timeout_s: float) -> None:
        """Finish the handshake within ``timeout_s``; ``ConnectionFailed`` if it does not."""
        sock.settimeout(timeout_s)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise ConnectionFailed(f"TLS handshake failed: {_reason(error)}") from error


class ClientTls:
    """The client side: TLS 1.3, then the server's identity checked against what it must be.

    ``pins`` decides for servers (None: any identity, recorded nowhere: only
    for a caller that checks another way, as the peer link's proofs do).
    ``identity`` is ours, which sessions prove to servers that ask (remote.py).
    """

    expected = ""  # the one identity a server must have ("": the pins decide)

    def __init__(self, pins: PinStore | None = None, identity: Identity | None = None) -> None:
        self.context = client_context()
        self.pins = pins
        self.identity = identity

    def __call__(self, sock: socket.socket, host: str, port: int) -> TlsSocket:
        """Secure a connected socket to a server; see ``handshake``."""
        return self.handshake(sock, host, port, self.expected)

    def expecting(self, identity: str) -> ClientTls:
        """This client's TLS, accepting only a server whose identity is ``identity`` (a seeder, a configured
        backup). Our own identity goes along, for the proofs a session gives (remote.py)."""
        pinned = copy.copy(self)
        pinned.expected = identity
        return pinned

    def handshake(self, sock: socket.socket, host: str, port: int, expected: str = "") -> TlsSocket:
        """TLS over ``sock`` and the identity check; closes ``sock`` and raises on failure.

        Raises ``ConnectionFailed`` if the handshake fails (worth retrying)
        and ``IdentityRefused`` if the server is not who it must be (not).
        """
        try:
            tls_sock = self.context.wrap_socket(sock, do_handshake_on_connect=False)
            tls_sock.do_handshake()
            seen = id_of_certificate(tls_sock.getpeercert(binary_form=True))
        except (OSError, ValueError) as error:
            sock.close()
            raise ConnectionFailed(f"TLS handshake with {host}:{port} failed: {_reason(error)}") from error
        try:
            self._check(f"{host}:{port}", seen, expected)
        except IdentityRefused:
            tls_sock.close()
            raise
        tls_sock.server_identity = seen
        return tls_sock

    def _check(self, address: str, seen: str, expected: str) -> None:
        if expected:
            if seen != expected:
                raise IdentityRefused(f"{address} presented identity {seen}, not the expected {expected}: "
                                      "refused (another machine in its place?)")
        elif self.pins is not None:
            self.pins.check(address, seen)


class PinStore:
    """Which identity each server address must present. Thread-safe.

    ``fixed`` maps ``host:port`` to ``(identity, config key)`` for the
    identities the config sets; they win. Other addresses are trusted on
    first use and remembered in ``path`` (JSON), so a later change is seen.
    """

    def __init__(self, path: Path, fixed: dict[str, tuple[str, str]] | None = None,
                 config_file: Path | None = None) -> None:
        self.path = Path(path)
        self.fixed = dict(fixed or {})
        self.config_file = config_file
        self._lock = threading.Lock()

    def check(self, address: str, seen: str) -> None:
        """Accept ``seen`` for ``address`` (pinning it if new); ``IdentityRefused`` if another is pinned."""
        if address in self.fixed:
            wanted, key = self.fixed[address]
            if seen != wanted:
                raise IdentityRefused(f"server {address} presented identity {seen}, but {key} in "
                                      f"{self.config_file or 'the config'} says {wanted}: refused; if that "
                                      f"server really has a new identity, set {key}: {seen}")
            return
        with self._lock:
            known = self._read()
            pinned = known.get(address)
            if pinned is None:
                known[address] = seen
                self._write(known)
                log.info("trusting server %s on first use: identity %s", address, seen)
                return
        if pinned != seen:
            raise IdentityRefused(f"server {address} presented identity {seen}, but this client knows it as "
                                  f"{pinned}: refused; if that server really has a new identity, remove "
                                  f"{address!r} from {self.path} (or set its server.*.id in the config)")

    def known(self) -> dict[str, str]:
        """Every pinned ``host:port`` and its identity, as remembered (not the config's)."""
        with self._lock:
            return self._read()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise IdentityRefused(f"cannot read the known servers in {self.path} ({error}); fix or remove it") from error
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write(self, known: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        aside.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(aside, self.path)


def client_tls(config: Config, identity: Identity) -> ClientTls | None:
    """How a client secures its connections: servers pinned as the config and its data folder say.

    None when ``transfer.encrypt`` is false (plain TCP, for measuring what
    TLS costs). Raises ``ConfigError`` if a configured identity has a typo.
    """
    if not config.transfer.encrypt:
        return None
    fixed = {}
    for key, server in (("server.main.id", config.server.main), ("server.backup.id", config.server.backup)):
        if server.id:
            try:
                fixed[f"{server.host}:{server.port}"] = (parse_id(server.id), key)
            except ValueError as error:
                raise ConfigError(f"{config.source or 'config'}: {key}: {error}") from None
    return ClientTls(PinStore(config.client.data_dir / PIN_FILE, fixed, config.source), identity)


def _reason(error: BaseException) -> str:
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
