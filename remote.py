"""Talking to one server: greeted sessions, a connection pool, and calls with retry.

A ``ServerSession`` is a connection that has said hello. A ``ConnectionPool``
keeps a few idle sessions per server so that a listing, a manifest and the
chunk streams of several downloads reuse connections instead of paying a TCP
and hello round trip each. ``ServerClient`` wraps single request/reply calls
in ``error_handler.retry`` so a busy, restarting or briefly unreachable server
is retried with backoff until ``retry_deadline_s``.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator, TypeVar

import protocol
from error_handler import ConnectionFailed, RemoteError, ServerBusy, retry
from integrity import Manifest
from protocol import ErrorCode, ErrorReply, Frame, Message
from transport import Connection

log = logging.getLogger(__name__)

AGENT = "minitorrent-client/1"
T = TypeVar("T")


class ServerSession:
    """A greeted connection to a server. One thread at a time."""

    def __init__(self, connection: Connection, welcome: protocol.Welcome) -> None:
        self.connection = connection
        self.welcome = welcome

    @classmethod
    def open(cls, host: str, port: int, *, io_timeout_s: float, role: str = "client") -> ServerSession:
        """Connect and say hello. Raises ``ConnectionFailed`` (``ServerBusy`` if full)."""
        connection = Connection.dial(host, port, io_timeout_s=io_timeout_s)
        try:
            connection.send(protocol.Hello(protocol.PROTOCOL_VERSION, role, AGENT))
            reply = expect_reply(connection.recv(), protocol.Welcome)
        except BaseException:
            connection.close()
            raise
        return cls(connection, reply)

    def call(self, request: Message, reply_type: type[Message], payload_buffer: bytearray | None = None) -> Frame:
        """Send ``request`` and return its reply frame, checked to be ``reply_type``."""
        self.connection.send(request)
        return self.receive(reply_type, payload_buffer)

    def receive(self, reply_type: type[Message], payload_buffer: bytearray | None = None) -> Frame:
        """Receive the next reply, checked to be ``reply_type`` (pipelining)."""
        frame = self.connection.recv(payload_buffer)
        expect_reply(frame, reply_type)
        return frame

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


def expect_reply(frame: Frame, reply_type: type[Message]) -> Message:
    """Return the frame's message if it is a ``reply_type``; raise otherwise.

    An ``ErrorReply`` becomes ``RemoteError`` (``ServerBusy`` for BUSY, which
    is worth retrying); any other message is a ``RemoteProtocolError``.
    """
    message = frame.message
    if isinstance(message, reply_type):
        return message
    if isinstance(message, ErrorReply):
        if message.code == ErrorCode.BUSY:
            raise ServerBusy(message.message)
        raise RemoteError(message.code, message.message)
    raise protocol.RemoteProtocolError(f"expected {reply_type.TYPE}, got {message.TYPE}")


class ConnectionPool:
    """Up to ``max_idle`` idle sessions to one server, reused across calls. Thread-safe."""

    def __init__(self, host: str, port: int, *, io_timeout_s: float, max_idle: int) -> None:
        self.host = host
        self.port = port
        self.io_timeout_s = io_timeout_s
        self.max_idle = max_idle
        self._idle: list[ServerSession] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` of the server."""
        return f"{self.host}:{self.port}"

    @contextlib.contextmanager
    def session(self) -> Iterator[ServerSession]:
        """Lend a session; it returns to the pool unless the body raised."""
        session = self._take_idle() or ServerSession.open(self.host, self.port, io_timeout_s=self.io_timeout_s)
        try:
            yield session
        except BaseException:
            session.close()  # its stream may be out of step: never reuse it
            raise
        self._give_back(session)

    def close(self) -> None:
        """Close every idle session."""
        with self._lock:
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()

    def _take_idle(self) -> ServerSession | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def _give_back(self, session: ServerSession) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(session)
                return
        session.close()


class ServerClient:
    """Request/reply calls to one server, retried with backoff. Thread-safe."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        io_timeout_s: float,
        pool_size: int,
        retry_deadline_s: float,
        stop: threading.Event | None = None,
    ) -> None:
        self.pool = ConnectionPool(host, port, io_timeout_s=io_timeout_s, max_idle=pool_size)
        self.retry_deadline_s = retry_deadline_s
        self.stop = stop or threading.Event()

    def close(self) -> None:
        """Close pooled connections."""
        self.pool.close()

    def call(self, operation: Callable[[ServerSession], T]) -> T:
        """Run ``operation`` on a pooled session, retrying connection failures."""

        def attempt() -> T:
            with self.pool.session() as session:
                return operation(session)

        def note(error: BaseException, delay_s: float) -> None:
            log.info("%s: %s; retrying in %.1f s", self.pool.address, error, delay_s)

        return retry(attempt, deadline_s=self.retry_deadline_s, retry_on=(ConnectionFailed,),
                     stop=self.stop, on_retry=note)

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
        """The server's metrics snapshot (with role, epoch and server_id)."""
        return self.call(lambda s: s.call(protocol.GetStatus(), protocol.StatusInfo)).message.metrics

    def report_downloaded(self, name: str, sha256: str) -> None:
        """Tell the server a download finished (it counts downloads per file)."""
        self.call(lambda s: s.call(protocol.ReportDownloaded(name, sha256), protocol.Ok))
