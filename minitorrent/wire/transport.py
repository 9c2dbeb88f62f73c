"""Moving protocol frames over a TCP socket: the only code that does it.

``protocol.py`` decides what the bytes are; this module sends and receives
them. Receiving reads the fixed prefix, then the header, then lets the payload
land in a buffer the caller owns (``recv_into``), so a 1 MiB chunk is received
without a fresh allocation each time. Sending a file payload uses
``socket.sendfile`` so the bytes go from the page cache to the socket without
passing through Python.

Every read has a deadline: the wait for the *first* byte of a frame may be
long (an idle connection), the rest of the frame must arrive within the I/O
timeout, so a peer that sends half a frame and stalls is cut off.
"""
from __future__ import annotations

import socket
import time
from typing import BinaryIO, Callable

from error_handler import ConnectionFailed
from minitorrent.wire import protocol
from minitorrent.wire.protocol import Frame, Message, ProtocolError, RemoteProtocolError

_MSG_MORE = getattr(socket, "MSG_MORE", 0)  # Linux: hold the header until the payload follows
_DRAIN_BYTES = 256 * 1024


class ConnectionClosed(ConnectionFailed):
    """The peer closed the connection, or it broke, or a read timed out."""


class Connection:
    """One framed, persistent connection. Not thread-safe: one user at a time."""

    def __init__(self, sock: socket.socket, *, io_timeout_s: float, idle_timeout_s: float | None = None):
        self.sock = sock
        self.io_timeout_s = io_timeout_s
        self.idle_timeout_s = idle_timeout_s if idle_timeout_s is not None else io_timeout_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self._prefix = bytearray(protocol.PREFIX_BYTES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def dial(cls, host: str, port: int, *, io_timeout_s: float,
             secure: Callable[[socket.socket, str, int], socket.socket] | None = None) -> Connection:
        """Open a TCP connection, secured by ``secure`` (TLS: tls.ClientTls); ``ConnectionFailed`` if it cannot be made."""
        try:
            sock = socket.create_connection((host, port), timeout=io_timeout_s)
        except OSError as error:
            raise ConnectionFailed(f"cannot connect to {host}:{port}: {_reason(error)}") from error
        if secure is not None:
            sock = secure(sock, host, port)  # it closes the socket if it raises
        return cls(sock, io_timeout_s=io_timeout_s)

    @property
    def peer(self) -> str:
        """``host:port`` of the other end, for logs."""
        try:
            host, port = self.sock.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "(disconnected)"

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        try:
            self.sock.close()
        except OSError:
            pass

    # Sending ------------------------------------------------------------------

    def send(self, message: Message, payload: bytes | memoryview = b"") -> None:
        """Send one frame. Raises ``ConnectionClosed`` if the socket fails."""
        head = protocol.encode_head(message, len(payload))
        self._send_all(head + bytes(payload) if payload else head)

    def send_many(self, messages: list[Message]) -> None:
        """Send several payload-less frames in one write (pipelined requests)."""
        self._send_all(b"".join(protocol.encode_head(m) for m in messages))

    def send_file_payload(self, message: Message, file: BinaryIO, offset: int, count: int) -> None:
        """Send ``message`` with ``count`` bytes of ``file`` from ``offset`` as payload.

        The payload goes with ``socket.sendfile``. If the file turns out
        shorter than promised the frame cannot be completed, so the connection
        is closed and ``ConnectionClosed`` raised.
        """
        head = protocol.encode_head(message, count)
        self.sock.settimeout(self.io_timeout_s)
        try:
            self.sock.sendall(head, _MSG_MORE)
            sent = self.sock.sendfile(file, offset, count) if count else 0
        except OSError as error:
            raise ConnectionClosed(f"send to {self.peer} failed: {_reason(error)}") from error
        self.bytes_sent += len(head) + sent
        if sent != count:
            self.close()
            raise ConnectionClosed(f"file ended after {sent} of {count} payload bytes")

    def _send_all(self, data: bytes) -> None:
        self.sock.settimeout(self.io_timeout_s)
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise ConnectionClosed(f"send to {self.peer} failed: {_reason(error)}") from error
        self.bytes_sent += len(data)

    # Receiving ----------------------------------------------------------------

    def recv(self, payload_buffer: bytearray | None = None, max_payload: int | None = None) -> Frame:
        """Receive one frame.

        With ``payload_buffer`` the payload is read into it and returned as a
        memoryview over it, valid until the buffer is reused; otherwise the
        payload is returned as ``bytes``. ``max_payload`` lowers the payload
        limit for this frame (a server accepts none from an unauthenticated
        peer), checked before anything is read. Raises ``ConnectionClosed`` on
        EOF, reset or timeout, and ``ProtocolError`` for a bad frame. A
        recoverable ``ProtocolError`` leaves the connection in step (its
        payload skipped).
        """
        self._read_exactly(memoryview(self._prefix), first_byte_timeout_s=self.idle_timeout_s)
        header_len, payload_len = protocol.parse_prefix(self._prefix)
        if max_payload is not None and payload_len > max_payload:
            raise RemoteProtocolError(f"a {payload_len}-byte payload is not accepted here (limit {max_payload})")
        header = bytearray(header_len)
        self._read_exactly(memoryview(header))
        try:
            message = protocol.decode_header(header, payload_len)
        except ProtocolError as error:
            if error.recoverable:
                self._skip(payload_len)
            raise
        return Frame(message, self._read_payload(payload_len, payload_buffer))

    def _read_payload(self, length: int, buffer: bytearray | None) -> bytes | memoryview:
        if length == 0:
            return b""
        if buffer is None or len(buffer) < length:
            buffer = bytearray(length)
            view = memoryview(buffer)
            self._read_exactly(view)
            return bytes(buffer)
        view = memoryview(buffer)[:length]
        self._read_exactly(view)
        return view

    def _skip(self, length: int) -> None:
        scratch = bytearray(min(length, _DRAIN_BYTES))
        while length:
            view = memoryview(scratch)[: min(length, len(scratch))]
            self._read_exactly(view)
            length -= len(view)

    def _read_exactly(self, view: memoryview, first_byte_timeout_s: float | None = None) -> None:
        """Fill ``view`` from the socket within the deadlines, or raise."""
        wanted = len(view)
        got = 0
        deadline = None
        while got < wanted:
            if got == 0 and first_byte_timeout_s is not None:
                timeout = first_byte_timeout_s
            else:
                deadline = deadline or time.monotonic() + self.io_timeout_s
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise ConnectionClosed(f"{self.peer} stalled mid-frame ({got} of {wanted} bytes)")
            self.sock.settimeout(timeout)
            try:
                n = self.sock.recv_into(view[got:])
            except socket.timeout as error:
                if got == 0 and first_byte_timeout_s is not None:
                    raise ConnectionClosed(f"{self.peer} idle for {timeout:g} s") from error
                raise ConnectionClosed(f"{self.peer} stalled mid-frame ({got} of {wanted} bytes)") from error
            except OSError as error:
                raise ConnectionClosed(f"connection to {self.peer} broke: {_reason(error)}") from error
            if n == 0:
                where = "between frames" if got == 0 and first_byte_timeout_s is not None else "mid-frame"
                raise ConnectionClosed(f"{self.peer} closed the connection {where}")
            got += n
            self.bytes_received += n


def _reason(error: OSError) -> str:
    if isinstance(error, socket.timeout):
        return "timed out"
    return error.strerror or type(error).__name__
