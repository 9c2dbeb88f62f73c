"""Talking to the servers: greeted sessions, connection pools, and failover.

A ``ServerSession`` is a connection that has said hello (and, for the main
server's peer links, proved it knows the shared secret). A ``ConnectionPool``
keeps a few idle sessions per server so that a listing, a manifest and the
chunk streams of several downloads reuse connections instead of paying a TCP
and hello round trip each.

``ServerClient`` (given the main server's ``secret``, it speaks as the main's
peer, which may also read a standby's replica) knows every configured server (the main and the backup). It
asks each for its role and epoch, talks to the *active* one with the highest
epoch, and when that one fails (refused, reset, timed out, or now on standby)
it forgets it and asks again, with backoff, until ``retry_deadline_s``. The
highest epoch it has seen goes into every hello, so a server that was active
before a failover learns at once that it no longer is.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator, TypeVar

from error_handler import (
    AuthenticationFailed,
    ConnectionFailed,
    MiniTorrentError,
    NotActive,
    RemoteError,
    ServerBusy,
    retry,
)
from integrity import Manifest
from minitorrent.wire import auth, protocol
from minitorrent.wire.identity import Identity
from minitorrent.wire.protocol import ErrorCode, ErrorReply, Frame, Message
from minitorrent.wire.tls import Secure, server_identity
from minitorrent.wire.transport import Connection

log = logging.getLogger(__name__)

AGENT = "minitorrent/1"
MAX_RECONNECT_DELAY_S = 0.5  # failover must be seen within about a second of the backup taking over
T = TypeVar("T")


class ServerSession:
    """A greeted connection to a server. One thread at a time."""

    def __init__(self, connection: Connection, welcome: protocol.Welcome) -> None:
        self.connection = connection
        self.welcome = welcome
        self.reusable = True  # False once replies may still be on their way (requests left in flight)

    @classmethod
    def open(cls, host: str, port: int, *, io_timeout_s: float, epoch: int = 0,
             secret: str | None = None, secure: Secure | None = None) -> ServerSession:
        """Connect (over TLS with ``secure``) and say hello; with ``secret``, as the main's authenticated peer link.

        Raises ``ConnectionFailed`` (``ServerBusy`` if full), ``RemoteError``,
        or ``AuthenticationFailed`` if the other side cannot prove the secret.
        """
        connection = Connection.dial(host, port, io_timeout_s=io_timeout_s, secure=secure)
        try:
            if secret is None:
                connection.send(protocol.Hello(protocol.PROTOCOL_VERSION, "client", AGENT, epoch))
                welcome = expect_reply(connection.recv(), protocol.Welcome)
                _identify(connection, getattr(secure, "identity", None), welcome)
            else:
                welcome = _authenticate(connection, secret, epoch, f"{host}:{port}")
        except BaseException:
            connection.close()
            raise
        return cls(connection, welcome)

    def call(self, request: Message, reply_type: type[Message], payload: bytes = b"",
             payload_buffer: bytearray | None = None) -> Frame:
        """Send ``request`` and return its reply frame, checked to be ``reply_type``."""
        self.connection.send(request, payload)
        return self.receive(reply_type, payload_buffer)

    def receive(self, reply_type: type[Message], payload_buffer: bytearray | None = None) -> Frame:
        """Receive the next reply, checked to be ``reply_type`` (pipelining)."""
        frame = self.connection.recv(payload_buffer)
        expect_reply(frame, reply_type)
        return frame

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


def status_of(address: tuple[str, int], io_timeout_s: float, secure: Secure | None = None) -> dict | None:
    """One server's own status (role, epoch, ...), asked directly, once; None if it does not answer.

    Unlike ``ServerClient.status`` this asks *that* server, active or not:
    what a test or a benchmark watching a failover needs.
    """
    try:
        session = ServerSession.open(*address, io_timeout_s=io_timeout_s, secure=secure)
    except MiniTorrentError:
        return None
    try:
        return session.call(protocol.GetStatus(), protocol.StatusInfo).message.metrics
    except MiniTorrentError:
        return None
    finally:
        session.close()


def _authenticate(connection: Connection, secret: str, epoch: int, where: str) -> protocol.Welcome:
    """The peer handshake: both sides answer the other's fresh challenge.

    Each proof also covers the server's TLS identity as we saw it: a machine in
    the middle presenting its own certificate gets proofs it cannot pass on.
    """
    nonce = auth.new_nonce()
    bound = server_identity(connection.sock)
    connection.send(protocol.Hello(protocol.PROTOCOL_VERSION, "main", AGENT, epoch, nonce))
    welcome = expect_reply(connection.recv(), protocol.Welcome)
    if not auth.proof_ok(secret, auth.SERVER_PURPOSE, f"{nonce}{bound}", welcome.proof):
        _tell_refused(connection)
        raise AuthenticationFailed(f"{where} could not prove it knows the cluster key; not replicating to it")
    connection.send(protocol.Authenticate(auth.prove(secret, auth.PEER_PURPOSE, f"{welcome.nonce}{bound}")))
    try:
        expect_reply(connection.recv(), protocol.Ok)
    except RemoteError as error:
        if error.code == ErrorCode.AUTH_FAILED:
            raise AuthenticationFailed(f"{where} refused our proof: {error.message}") from error
        raise
    return welcome


def _identify(connection: Connection, identity: Identity | None, welcome: protocol.Welcome) -> None:
    """Prove our identity to a server that asked (its nonce, over TLS): what pairing and counts rest on."""
    if identity is None or not welcome.nonce:
        return
    certificate, signature = identity.identify(server_identity(connection.sock), welcome.nonce)
    connection.send(protocol.Identify(certificate, signature))
    expect_reply(connection.recv(), protocol.Ok)


def _tell_refused(connection: Connection) -> None:
    """Let a server whose proof failed log the refusal too: an empty proof fails its check and reveals nothing.

    (Our real proof is never sent to a server that could not prove itself:
    it could use it to pass as us elsewhere.)
    """
    try:
        connection.send(protocol.Authenticate(""))
    except ConnectionFailed:
        pass


def expect_reply(frame: Frame, reply_type: type[Message]) -> Message:
    """Return the frame's message if it is a ``reply_type``; raise otherwise.

    An ``ErrorReply`` becomes ``RemoteError``, except BUSY (``ServerBusy``)
    and STANDBY (``NotActive``), which are worth retrying elsewhere or later.
    Any other message is a ``RemoteProtocolError``.
    """
    message = frame.message
    if isinstance(message, reply_type):
        return message
    if isinstance(message, ErrorReply):
        if message.code == ErrorCode.BUSY:
            raise ServerBusy(message.message)
        if message.code == ErrorCode.STANDBY:
            raise NotActive(message.message)
        raise RemoteError(message.code, message.message)
    raise protocol.RemoteProtocolError(f"expected {reply_type.TYPE}, got {message.TYPE}")


class ConnectionPool:
    """Up to ``max_idle`` idle sessions to one server, reused across calls. Thread-safe."""

    def __init__(self, host: str, port: int, *, io_timeout_s: float, max_idle: int,
                 epoch: Callable[[], int] = lambda: 0, secret: str | None = None,
                 secure: Secure | None = None) -> None:
        self.host = host
        self.port = port
        self.secret = secret
        self.secure = secure
        self.io_timeout_s = io_timeout_s
        self.max_idle = max_idle
        self._epoch = epoch
        self._idle: list[ServerSession] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` of the server."""
        return f"{self.host}:{self.port}"

    def open_session(self) -> ServerSession:
        """A new greeted session (not from the pool)."""
        return ServerSession.open(self.host, self.port, io_timeout_s=self.io_timeout_s, epoch=self._epoch(),
                                  secret=self.secret, secure=self.secure)

    @contextlib.contextmanager
    def session(self) -> Iterator[ServerSession]:
        """Lend a session; it returns to the pool unless the body raised."""
        session = self._take_idle() or self.open_session()
        try:
            yield session
        except BaseException:
            session.close()  # its stream may be out of step: never reuse it
            raise
        self.give_back(session)

    def give_back(self, session: ServerSession) -> None:
        """Keep ``session`` for reuse, or close it if the pool is full or its stream is not clean."""
        with self._lock:
            if session.reusable and len(self._idle) < self.max_idle:
                self._idle.append(session)
                return
        session.close()

    def close(self) -> None:
        """Close every idle session."""
        with self._lock:
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()

    def _take_idle(self) -> ServerSession | None:
        with self._lock:
            return self._idle.pop() if self._idle else None


class ServerClient:
    """Request/reply calls to whichever configured server is active. Thread-safe."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        *,
        io_timeout_s: float,
        pool_size: int,
        retry_deadline_s: float,
        stop: threading.Event | None = None,
        secret: str | None = None,
        secure: Secure | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one server address is needed")
        self.pools = [ConnectionPool(host, port, io_timeout_s=io_timeout_s, max_idle=pool_size,
                                     epoch=lambda: self.known_epoch, secret=secret, secure=secure)
                      for host, port in addresses]
        self.secure = secure  # how every connection is secured (TLS), for callers dialling others (peers)
        self.as_peer = secret is not None  # the main fetching from the backup may read a standby's replica
        self.retry_deadline_s = retry_deadline_s
        self.stop = stop or threading.Event()
        self.known_epoch = 0
        self.current: protocol.Welcome | None = None
        self._active: ConnectionPool | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close pooled connections."""
        for pool in self.pools:
            pool.close()

    def active_pool(self) -> ConnectionPool:
        """The pool of the active server with the highest epoch, asking them all if unknown.

        Raises ``NotActive`` (a ``ConnectionFailed``) if none is active now.
        """
        with self._lock:
            if self._active is not None:
                return self._active
        return self._choose_active()

    def forget(self, pool: ConnectionPool) -> None:
        """``pool``'s server failed us: drop its sessions and choose again next time."""
        with self._lock:
            if self._active is pool:
                self._active = None
        pool.close()

    def _choose_active(self) -> ConnectionPool:
        best: tuple[int, ConnectionPool, ServerSession] | None = None
        reasons = []
        for pool in self.pools:
            try:
                session = pool.open_session()
            except (ConnectionFailed, RemoteError) as error:
                reasons.append(f"{pool.address}: {error}")
                continue
            welcome = session.welcome
            self.known_epoch = max(self.known_epoch, welcome.epoch)
            if welcome.role != "active" and not self.as_peer:
                reasons.append(f"{pool.address}: {welcome.server or 'server'} on standby")
                session.close()
            elif best is None or welcome.epoch > best[0]:
                if best:
                    best[2].close()
                best = (welcome.epoch, pool, session)
            else:
                session.close()
        if best is None:
            raise NotActive("no active server: " + "; ".join(reasons))
        epoch, pool, session = best
        pool.give_back(session)
        with self._lock:
            self._active, self.current = pool, session.welcome
        log.info("talking to the %s server at %s (epoch %d)", session.welcome.server, pool.address, epoch)
        return pool

    def call(self, operation: Callable[[ServerSession], T]) -> T:
        """Run ``operation`` on a session of the active server, failing over and retrying."""

        def attempt() -> T:
            pool = self.active_pool()
            try:
                with pool.session() as session:
                    return operation(session)
            except ConnectionFailed:
                self.forget(pool)
                raise

        def note(error: BaseException, delay_s: float) -> None:
            log.info("%s; retrying in %.1f s", error, delay_s)

        return retry(attempt, deadline_s=self.retry_deadline_s, retry_on=(ConnectionFailed,),
                     max_delay_s=MAX_RECONNECT_DELAY_S, stop=self.stop, on_retry=note)

    def try_call(self, operation: Callable[[ServerSession], T]) -> T | None:
        """One attempt at ``operation`` on the active server; None if no server answers now."""
        try:
            pool = self.active_pool()
            try:
                with pool.session() as session:
                    return operation(session)
            except ConnectionFailed:
                self.forget(pool)
                raise
        except ConnectionFailed as error:
            log.debug("no answer now: %s", error)
            return None

    def list_files(self, search: str = "") -> list[dict]:
        """Every catalog entry matching ``search``, fetched page by page."""
        entries: list[dict] = []
        while True:
            page = self.call(lambda s: s.call(protocol.ListFiles(search, len(entries)), protocol.FileList)).message
            entries.extend(page.files)
            if not page.files or len(entries) >= page.total:
                return entries

    def manifest(self, name: str) -> Manifest:
        """The manifest of ``name``. Raises ``RemoteError`` (NOT_FOUND) if unknown."""
        frame = self.call(lambda s: s.call(protocol.GetManifest(name), protocol.ManifestInfo))
        info = frame.message
        try:
            return Manifest.from_header(info.to_header(), bytes(frame.payload))
        except ValueError as error:
            raise protocol.RemoteProtocolError(f"server sent a bad manifest for {name}: {error}") from error

    def count(self) -> tuple[int, int]:
        """(number of files, total bytes) in the catalog."""
        reply = self.call(lambda s: s.call(protocol.CountFiles(), protocol.FileCount)).message
        return reply.files, reply.bytes

    def status(self) -> dict:
        """The active server's metrics snapshot, with its address, role and epoch."""
        snapshot = self.call(lambda s: s.call(protocol.GetStatus(), protocol.StatusInfo)).message.metrics
        with self._lock:
            snapshot["address"] = self._active.address if self._active else ""
        return snapshot

    def report_downloaded(self, name: str, sha256: str) -> None:
        """Tell the server a download finished (it counts downloads per file)."""
        self.call(lambda s: s.call(protocol.ReportDownloaded(name, sha256), protocol.Ok))
